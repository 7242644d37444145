# What launchers/slurm/*.sbatch share, sourced inside the job on its first node (not a script of its own).
# The sbatch script sets ENTRY, CONFIG, RESUME and HVPMTL_ROOT, then calls, in order:
#   hvpmtl_job_setup "$@"   the environment's python, the launcher's arguments, GPU checks, rendezvous, threads
#   hvpmtl_job_end $rc      log the exit code; 3 (preempted, checkpoint saved) -> scontrol requeue
# and starts the ranks in between with "$HVPMTL_PYTHON" ... "$ENTRY" "${HVPMTL_ARGS[@]}".
# Exit 2 (as a config error) when the job cannot work: no environment, tasks that do not match the GPUs.

set -uo pipefail

hvpmtl_fail() {
  echo "error: $*" >&2
  exit 2
}

# The environment's python: HVPMTL_PYTHON, else the checkout's .venv (made by `make setup`), which every node
# must see at the same path.
hvpmtl_python() {
  HVPMTL_PYTHON=${HVPMTL_PYTHON:-$HVPMTL_ROOT/.venv/bin/python}
  [[ -x $HVPMTL_PYTHON ]] || hvpmtl_fail "no python at $HVPMTL_PYTHON: run \`make setup\` in $HVPMTL_ROOT" \
    "(it creates .venv there; every node must see it at this path), or set HVPMTL_PYTHON to the python of the" \
    "environment where hvpmtl is installed"
  "$HVPMTL_PYTHON" -c "import hvpmtl" 2>/dev/null || hvpmtl_fail "$HVPMTL_PYTHON cannot import hvpmtl:" \
    "run \`make setup\` in $HVPMTL_ROOT, or set HVPMTL_PYTHON to the python of the environment where hvpmtl is installed"
  export HVPMTL_PYTHON
}

# The launcher's arguments: --config CONFIG --resume RESUME, EXTRA_ARGS (an environment variable, split by shell
# quoting rules without running anything: "--set 'run.name=my run'"), then the script's own arguments as given.
# A --config or --resume among them replaces CONFIG / RESUME; a requeued start always resumes (auto).
hvpmtl_arguments() {
  local -a given=() rest=()
  local split
  if [[ -n ${EXTRA_ARGS:-} ]]; then
    split=$("$HVPMTL_PYTHON" -c 'import shlex, sys; print("\n".join(shlex.split(sys.argv[1])))' "$EXTRA_ARGS" 2>/dev/null) ||
      hvpmtl_fail "EXTRA_ARGS is not valid shell quoting: $EXTRA_ARGS"
    [[ -n $split ]] && mapfile -t given <<<"$split"
  fi
  given+=("$@")
  set -- "${given[@]}"
  while (($#)); do
    case $1 in
      --config) CONFIG=${2-}; shift $(($# > 1 ? 2 : 1)) ;;
      --config=*) CONFIG=${1#*=}; shift ;;
      --resume) RESUME=${2-}; shift $(($# > 1 ? 2 : 1)) ;;
      --resume=*) RESUME=${1#*=}; shift ;;
      *) rest+=("$1"); shift ;;
    esac
  done
  ((${SLURM_RESTART_COUNT:-0} > 0)) && RESUME=auto
  HVPMTL_ARGS=(--config "$CONFIG" --resume "$RESUME" "${rest[@]}")
}

# One task per GPU, every task seeing all GPUs of its node (hvpmtl uses cuda:LOCAL_RANK).
hvpmtl_gpus() {
  local gpus=${SLURM_GPUS_ON_NODE:-}
  local -a ids
  if [[ -z $gpus && -n ${SLURM_JOB_GPUS:-} ]]; then  # Slurm's list of this node's GPU indices
    IFS=, read -r -a ids <<<"$SLURM_JOB_GPUS"
    gpus=${#ids[@]}
  fi
  gpus=${gpus:-0}
  [[ -z ${SLURM_GPUS_PER_TASK:-} ]] || hvpmtl_fail "--gpus-per-task=$SLURM_GPUS_PER_TASK gives each task only its" \
    "own GPU, but hvpmtl uses cuda:LOCAL_RANK: request GPUs per node (--gres=gpu:N --ntasks-per-node=N)"
  if ((gpus > 0)) && [[ ${SLURM_NTASKS_PER_NODE:-} != "$gpus" ]]; then
    hvpmtl_fail "one task per GPU needed: --ntasks-per-node=${SLURM_NTASKS_PER_NODE:-unset} but $gpus GPU(s)" \
      "per node: give both, e.g. sbatch --gres=gpu:$gpus --ntasks-per-node=$gpus ..."
  fi
  if ((gpus == 0)); then
    echo "note: no GPUs allocated (--gres=gpu:0): the ranks run on the CPU with gloo"
  fi
  HVPMTL_GPUS_PER_NODE=$gpus
}

# Rendezvous at the first node of the allocation; the port from the job id, so two jobs sharing a node differ
# and a requeued job (same id, the old one gone) keeps it.
hvpmtl_rendezvous() {
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  [[ -n $MASTER_ADDR ]] || hvpmtl_fail "cannot expand SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST' with scontrol"
  MASTER_PORT=$((20000 + SLURM_JOB_ID % 40000))
  export MASTER_ADDR MASTER_PORT
}

# Threads: srun of Slurm 22.05-23.02 does not pass the job's --cpus-per-task on to its tasks (each would get one
# CPU, and DALI's threads with it) unless SRUN_CPUS_PER_TASK says so; OpenMP gets the task's CPUs, not the node's.
hvpmtl_threads() {
  if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}
  fi
}

hvpmtl_job_setup() {
  cd "$HVPMTL_ROOT" || hvpmtl_fail "cannot enter the checkout $HVPMTL_ROOT"
  [[ -f $ENTRY ]] || hvpmtl_fail "$ENTRY not found in $PWD: set HVPMTL_ROOT to the hvpmtl checkout"
  hvpmtl_python
  hvpmtl_arguments "$@"
  hvpmtl_gpus
  hvpmtl_rendezvous
  hvpmtl_threads
  # The batch shell outlives the tasks' checkpoint-and-exit: log the signal, do not die of it.
  trap 'echo "$(date +%FT%T) batch script got SIGUSR1 (the tasks checkpoint and exit 3)"' USR1
  trap 'echo "$(date +%FT%T) batch script got SIGTERM (the tasks checkpoint and exit 3)"' TERM
  echo "$(date +%FT%T) job $SLURM_JOB_ID start ${SLURM_RESTART_COUNT:-0}: $SLURM_JOB_NUM_NODES node(s) x" \
    "${SLURM_NTASKS_PER_NODE:-?} task(s), $HVPMTL_GPUS_PER_NODE GPU(s) per node, master $MASTER_ADDR:$MASTER_PORT," \
    "python $HVPMTL_PYTHON, OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset} SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-unset}," \
    "config $CONFIG, resume $RESUME"
}

hvpmtl_job_end() {
  local rc=$1
  echo "$(date +%FT%T) training exited with code $rc"
  if ((rc == 3)); then
    # 3 = preempted with a checkpoint saved: queue the same job again; it resumes with --resume auto.
    echo "requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "error: scontrol requeue $SLURM_JOB_ID failed; submit the job again (it resumes from the checkpoint)" >&2
  fi
  exit "$rc"
}
