#!/usr/bin/env bash
# Debian packages the cluster tests need: a real one-node Slurm (slurmctld, slurmd, munge)
# and pdsh + sshd for `deepspeed --hostfile`. Installs only what is missing; starts nothing
# (the tests start the daemons themselves, on 127.0.0.1).
set -euo pipefail
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge pdsh:pdsh sshd:openssh-server ssh:openssh-client; do
  bin=${pair%%:*}; pkg=${pair#*:}
  command -v "$bin" >/dev/null 2>&1 || [[ -x /usr/sbin/$bin ]] || need+=("$pkg")
done
if ((${#need[@]})); then
  echo "installing Debian packages: ${need[*]}"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
