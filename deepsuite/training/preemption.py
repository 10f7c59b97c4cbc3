"""Preemption: SIGUSR1 / SIGTERM become a checkpoint at the next step boundary (and a requeue).

The flag is agreed across ranks with one tiny all-reduce per step, so every rank saves and
stops at the same step; see slurm/README.md for the sbatch side (``--signal=USR1@300``).
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import torch
import torch.distributed as dist


class StopRequested:
    """Set by SIGTERM / SIGUSR1 (preemption notice): save at the next step boundary and exit.

    SIGUSR1 is the notice asked for with ``sbatch --signal=USR1@<s>`` (see slurm/): after the
    checkpoint is committed, rank 0 requeues the SLURM batch job, which then resumes from it.
    SIGTERM only saves: SLURM sends it when the job is already ending (time limit, scancel, its
    own preempt-requeue), where a requeue would fail or bring back a job the user cancelled.
    Set DEEPSUITE_REQUEUE=0 to never requeue.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (one tiny all-reduce).

        Every rank then holds the same ``signal``: the largest number any rank received (SIGTERM
        wins over SIGUSR1), so all ranks take the same decision.
        """
        flag = torch.tensor([0 if self.signal is None else int(self.signal)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()) == 0:
            return False
        self.signal = int(flag.item())
        return True

    def requeue(self, rank: int, environ: dict[str, str] | None = None) -> bool:
        """On rank 0 after SIGUSR1 in a SLURM job: ``scontrol requeue $SLURM_JOB_ID``.

        Call only once the checkpoint is committed: SLURM kills the job's processes when it
        requeues. Returns True when the job was requeued; a failure is printed, not raised
        (the checkpoint is safe either way; resubmitting the same command resumes from it).
        """
        env = os.environ if environ is None else environ
        job = env.get("SLURM_JOB_ID", "")
        if rank != 0 or self.signal != signal.SIGUSR1 or not job:
            return False
        if env.get("DEEPSUITE_REQUEUE", "1") == "0":
            return False
        try:
            res = subprocess.run(
                ["scontrol", "requeue", job],
                capture_output=True,
                text=True,
                timeout=60,
                env=dict(env),
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            print(f"preempted: could not requeue SLURM job {job}: {err}", flush=True)
            return False
        if res.returncode != 0:
            print(
                f"preempted: scontrol requeue {job} failed ({res.returncode}): "
                f"{res.stderr.strip()}; resubmit to resume",
                flush=True,
            )
            return False
        print(f"preempted: checkpoint committed, SLURM job {job} requeued", flush=True)
        return True
