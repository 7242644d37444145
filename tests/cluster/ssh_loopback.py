"""An sshd on 127.0.0.1 with its own host key, port and authorized key, for `deepspeed --launcher pdsh`.

pdsh's ssh module runs plain `ssh`; PDSH_SSH_ARGS_APPEND (from `ssh_env`) gives it our key and
tells it not to trust or record host keys. `deepspeed --ssh_port PORT` adds the port.
"""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from .procs import Daemon, descendants, free_port, logs_tail, run, wait_until

SSHD_CONFIG_TEMPLATE = """\
# Loopback sshd for the cluster tests (written by tests/cluster/ssh_loopback.py)
Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/host_ed25519
AuthorizedKeysFile {dir}/authorized_keys
PidFile {dir}/sshd.pid
UsePAM no
# the key lives under /tmp, whose mode StrictModes rejects
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
X11Forwarding no
AllowTcpForwarding no
LogLevel INFO
"""


class LoopbackSshd:
    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.port = 0
        self.key = self.dir / "client_ed25519"
        self.daemon: Daemon | None = None

    @property
    def ssh_options(self) -> list[str]:
        return ["-i", str(self.key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "AddressFamily=inet",
                "-o", "ConnectTimeout=10"]

    def ssh_env(self) -> dict:
        """What a `deepspeed --launcher pdsh --ssh_port PORT` call needs on top of its environment."""
        return {"PDSH_RCMD_TYPE": "ssh", "PDSH_SSH_ARGS_APPEND": " ".join(self.ssh_options)}

    def start(self, timeout: float = 20.0) -> "LoopbackSshd":
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        for tool in (sshd, shutil.which("ssh-keygen"), shutil.which("ssh"), shutil.which("pdsh")):
            if not tool or not os.access(tool, os.X_OK):
                raise AssertionError("sshd, ssh, ssh-keygen or pdsh missing: install the cluster test packages "
                                     "with `bash tools/install_system_deps.sh` (as root)")
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        for name in ("host_ed25519", "client_ed25519"):
            if not (self.dir / name).exists():
                run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / name)], timeout=30)
        (self.dir / "authorized_keys").write_text((self.dir / "client_ed25519.pub").read_text())
        os.chmod(self.dir / "authorized_keys", 0o600)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
        self.port = free_port()
        conf = self.dir / "sshd_config"
        conf.write_text(SSHD_CONFIG_TEMPLATE.format(port=self.port, dir=self.dir))
        log = self.dir / "sshd.log"
        run([sshd, "-t", "-f", str(conf)], timeout=15)
        self.daemon = Daemon("sshd", [sshd, "-D", "-e", "-f", str(conf)], log)
        try:
            wait_until(lambda: self.daemon.check_alive() or "Server listening" in log.read_text(errors="replace"),
                       timeout, f"sshd to listen on 127.0.0.1:{self.port}", [log])
            out = run(["ssh", *self.ssh_options, "-p", str(self.port), "localhost", "echo", "ssh-ok"],
                      timeout=timeout, check=False)
            assert out.stdout.strip() == "ssh-ok", (f"ssh to 127.0.0.1:{self.port} failed: {out.stderr}\n"
                                                    f"{logs_tail([log])}")
        except BaseException:
            self.stop()
            raise
        return self

    def kill_sessions(self):
        """SIGKILL everything running under sshd's connections (remote ranks pdsh left behind)."""
        if self.daemon is not None and self.daemon.alive():
            for pid in reversed(descendants(self.daemon.proc.pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def stop(self):
        if self.daemon is not None:
            self.kill_sessions()
            self.daemon.stop()
            self.daemon = None
