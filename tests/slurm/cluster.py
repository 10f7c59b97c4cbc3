"""A real SLURM cluster on this machine: munged + slurmctld + two slurmd "nodes" on 127.0.0.1.

    with SlurmCluster(workdir) as c:                  # starts the daemons, waits for idle nodes
        job = c.sbatch(["slurm/train_torchrun.sbatch", "configs/tiny.yaml"], env=...)
        c.wait(job)                                    # -> final state, e.g. "COMPLETED"

Also a script, for poking at the sbatch scripts by hand (needs root and Debian's slurm-wlm + munge:
``bash scripts/ci_services.sh`` installs them)::

    python tests/slurm/cluster.py [--workdir DIR]     # prints `export SLURM_CONF=...`; Ctrl-C stops

Everything (config, keys, sockets, spool, logs) lives in ``workdir``; every daemon is started by
this module as a child process and stopped by its PID. Written by hand: no library starts a
throwaway SLURM.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")
NODES = ("n1", "n2")
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def missing_binaries() -> list[str]:
    """The SLURM / munge programs not found on PATH (or in /usr/sbin)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _which(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        raise FileNotFoundError(f"{name}: not installed (run scripts/ci_services.sh)")
    return found


class SlurmCluster:
    """Start/stop a two-node SLURM in ``workdir``; ``env`` is what clients (sbatch, ...) need.

    Args:
        workdir: an empty or missing directory; keep it short (munge's socket path must fit in
            108 bytes).
        cpus_per_node: CPUs each fake node declares (two nodes share this machine's cores).
    """

    def __init__(self, workdir: Path | str, cpus_per_node: int = 1) -> None:
        if cpus_per_node < 1:
            raise ValueError(f"cpus_per_node: expected >= 1, got {cpus_per_node}")
        self.dir = Path(workdir).resolve()
        self.cpus = cpus_per_node
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "sock"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 30.0) -> None:
        if os.geteuid() != 0:
            raise PermissionError("SlurmCluster: slurmd must run as root (SlurmUser=root)")
        for sub in ("munge", "state", "spool/n1", "spool/n2", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "munge").chmod(0o700)
        key = self.dir / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--log-file={self.dir / 'log' / 'munged.log'}",
                f"--pid-file={self.dir / 'munge' / 'munged.pid'}",
                f"--seed-file={self.dir / 'munge' / 'seed'}",
            ],
        )
        self._wait_for(self.munge_socket.exists, timeout_s, "munged socket")
        self._write_conf()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for node in NODES:
            self._spawn(
                f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)]
            )
        self._wait_for(self._nodes_idle, timeout_s, "both nodes idle")

    def stop(self) -> None:
        """SIGTERM every daemon we started (slurmd first), then SIGKILL what is left."""
        order = [n for n in self.procs if n.startswith("slurmd")] + [
            n for n in ("slurmctld", "munged") if n in self.procs
        ]
        for name in order:
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.procs.clear()

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.dir / "log" / f"{name}.stdout", "ab")  # noqa: SIM115 (lives with the proc)
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()

    def _wait_for(self, ok: object, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(
                    f"SLURM daemon(s) {dead} exited while waiting for {what}:\n" + self.logs_tail()
                )
            if ok():  # type: ignore[operator]
                return
            time.sleep(0.2)
        raise TimeoutError(
            f"SLURM: timed out after {timeout_s} s waiting for {what}:\n" + self.logs_tail()
        )

    def _nodes_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
        states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
        return all(states.get(n) == "idle" for n in NODES)

    def _write_conf(self) -> None:
        host = socket.gethostname()
        d = self.dir
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} "
            f"CPUs={self.cpus} RealMemory=2000 State=UNKNOWN"
            for n in NODES
        )
        self.conf.write_text(
            f"""# written by tests/slurm/cluster.py
ClusterName=deepsuite-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s)
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# one line per job end (requeues included): what sacct would show, without slurmdbd
JobCompType=jobcomp/filetxt
JobCompLoc={d}/log/jobcomp.txt
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
# job ids that do not repeat from one cluster to the next (logs are named by them)
FirstJobId={int(time.time()) % 50_000_000 + 1}
KillWait=5
MinJobAge=600
SchedulerType=sched/builtin
# look at pending jobs every 2 s (default 60): a requeued job restarts once cred_expire has passed
SchedulerParameters=sched_interval=2
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )

    # ---- clients ------------------------------------------------------------------------------
    def run(
        self, argv: Sequence[str], check: bool = True, env: Mapping[str, str] | None = None
    ) -> str:
        """Run a SLURM client command against this cluster; returns stdout."""
        res = subprocess.run(
            list(argv), capture_output=True, text=True, env={**self.env, **(env or {})}, timeout=60
        )
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def sbatch(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> int:
        """Submit ``sbatch --parsable <argv>`` from ``cwd``; returns the job id."""
        res = subprocess.run(
            ["sbatch", "--parsable", *argv],
            capture_output=True,
            text=True,
            cwd=cwd,
            env={**self.env, **(env or {})},
            timeout=60,
        )
        if res.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(argv)} failed: {res.stderr.strip()}")
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, NodeList, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout_s: float = 300.0, poll_s: float = 0.5) -> str:
        """Block until the job reaches a terminal state; return it (scancel on timeout)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.job(job_id).get("JobState", "")
            if state in TERMINAL:
                return state
            time.sleep(poll_s)
        with contextlib.suppress(Exception):
            self.run(["scancel", str(job_id)])
        raise TimeoutError(f"job {job_id} still {state} after {timeout_s} s:\n{self.logs_tail()}")

    def logs_tail(self, n: int = 15) -> str:
        parts = []
        for path in sorted((self.dir / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-n:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)


def main() -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="state dir (default: a new temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="slurm-")

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    # Ctrl-C or `kill PID` stops the daemons (SIGINT is ignored in a shell's background job)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, leave)
    with SlurmCluster(workdir) as c:
        print(
            f"export SLURM_CONF={c.conf}   # nodes n1 n2 idle; Ctrl-C or kill stops the daemons",
            flush=True,
        )
        with contextlib.suppress(SystemExit):
            signal.pause()


if __name__ == "__main__":
    main()
