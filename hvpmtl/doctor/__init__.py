"""`hvpmtl doctor`: a pre-flight on every rank of a hostfile or Slurm allocation, started by the same launchers
as training (`deepspeed --hostfile hosts launchers/doctor.py --config C`, `srun`, launchers/slurm/doctor.sbatch),
so a mismatched node fails in seconds instead of as a collective timeout an hour into the queue.

Every rank builds one record (host, hvpmtl revision and a hash of its sources, torch/DeepSpeed/DALI/CUDA
versions, GPU, the data index's identity, what it saw of the shared `run.output_dir`, its clock against the other
ranks and against that file system's mtimes, one timed all-reduce of the gradient size, free memory against the
config's need); rank 0 gathers them (all_gather_object), compares, prints one table and the problems, each
naming host and rank. Exit codes: 0 every check passed, 2 config error, 5 a rank did not answer (collective
failed or timed out), 7 some check failed.

    versions.py    what the rank runs: hvpmtl revision and sources hash, Python/torch/DeepSpeed/DALI/CUDA, GPU
    data_index.py  the data index the run maps and its identity
    output_dir.py  the shared run.output_dir: probe files every rank writes and reads, the file system's clock
    allreduce.py   one timed all-reduce of the gradient's size
    memory.py      the config's model states per rank against free memory
    compare.py     the records compared (`Limits`, `Problem`, `compare`)
    report.py      the table rank 0 prints
    preflight.py   one rank's run (`main`) and the exit codes
    cli.py         the launcher's parser and `hvpmtl doctor`
"""
