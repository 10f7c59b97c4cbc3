"""Preemption: a notice (SIGUSR1) or SIGTERM becomes a checkpoint at a step boundary, then a
requeue, or an exit status that tells the scheduler the run did not finish.

When each is heard:
- SIGUSR1 (``sbatch --signal=USR1@<s>``, ``scancel --signal=USR1``) from the start of the process:
  the entry point calls :func:`listen` before its slow imports.
- A notice that came before this process existed or listened (SLURM signals every process of the
  job step at once, while torchrun's workers may not be started yet) is kept by slurm/task.sh and
  the sbatch scripts, which create the file named by ``DEEPSUITE_NOTICE``; it counts as SIGUSR1.
- SIGTERM once training starts; before that its default (dying at once) loses nothing.

Ranks agree on the flag with one tiny all-reduce before the first step and after every step, so
all of them stop at the same step. What happens after the stop (:meth:`StopRequested.conclude`):
- ``DEEPSUITE_OUTCOME`` set (the sbatch scripts in slurm/ set it): the first rank of every node
  writes ``preempted <step> <signal>`` to that node-local file and every rank exits 0; the batch
  script requeues the job once every process of the step has exited (nothing left to kill, so
  nothing prints a traceback), or exits :data:`NOT_FINISHED`.
- otherwise, SIGUSR1 inside a SLURM job: rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` itself
  (SLURM then terminates the job's processes).
- a run that stopped early and was not requeued exits :data:`NOT_FINISHED` on every rank, so
  ``afterok`` dependencies and sacct do not count it as a success.
SIGTERM never requeues: SLURM sends it when the job is ending anyway (time limit, scancel, its own
preempt-requeue). ``DEEPSUITE_REQUEUE=0`` turns requeueing off.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deepsuite.atomic import atomic_write_text

# sysexits.h EX_TEMPFAIL ("temporary failure; the user is invited to retry"): stopped before the
# last step with a checkpoint committed and not requeued; rerunning the same command resumes.
NOT_FINISHED = 75


@dataclass(frozen=True)
class Outcome:
    """How a run ended: the line rank 0 prints last, and the process's exit status."""

    line: str
    exit_code: int


class StopRequested:
    """Records SIGUSR1 (and, after :meth:`listen_for_term`, SIGTERM) for the training loop."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.signal: int | None = None
        self.notice_file = env.get("DEEPSUITE_NOTICE") or None
        self._listen(signal.SIGUSR1)

    def _listen(self, signum: int) -> None:
        signal.signal(signum, self._handle)
        # restart system calls the signal interrupts (rendezvous sockets, gloo) instead of
        # failing them with EINTR: the handler only sets a flag
        signal.siginterrupt(signum, False)

    def listen_for_term(self) -> None:
        """SIGTERM from now on also stops at the next step boundary (with a checkpoint)."""
        self._listen(signal.SIGTERM)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = max(self.signal or 0, signum)  # SIGTERM (15) wins over SIGUSR1 (10)

    def pending(self) -> int | None:
        """This process's signal, or SIGUSR1 when the notice file exists."""
        if self.signal is None and self.notice_file and os.path.exists(self.notice_file):
            self.signal = signal.SIGUSR1
        return self.signal

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (one tiny all-reduce).

        Every rank then holds the same ``signal``: the largest number any rank received (SIGTERM
        wins over SIGUSR1), so all ranks take the same decision.
        """
        import torch
        import torch.distributed as dist

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([self.pending() or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()) == 0:
            return False
        self.signal = int(flag.item())
        return True

    def requeue(self, rank: int, environ: Mapping[str, str] | None = None) -> bool:
        """On rank 0 after SIGUSR1 in a SLURM job: ``scontrol requeue $SLURM_JOB_ID``.

        Call only once the checkpoint is committed: SLURM kills the job's processes when it
        requeues. Returns True when the job was requeued; a failure is printed, not raised (the
        checkpoint is safe either way).
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
                f"{res.stderr.strip()}",
                flush=True,
            )
            return False
        return True

    def conclude(
        self,
        *,
        step: int,
        last_step: int,
        saved: bool,
        rank: int,
        local_rank: int,
        environ: Mapping[str, str] | None = None,
    ) -> Outcome:
        """After the final save: hand the requeue over, requeue, or say the run is unfinished.

        Collective when stopped early without ``DEEPSUITE_OUTCOME`` (rank 0's requeue result is
        broadcast), so call it on every rank.

        Args:
            step: the step the run stopped at.
            last_step: the step this invocation was meant to reach.
            saved: whether a checkpoint of ``step`` was committed now (False when no step ran:
                the latest checkpoint, or the start, is already this state).
        """
        env = os.environ if environ is None else environ
        if self.signal is None or step >= last_step:  # a notice at the last step changes nothing
            return Outcome(f"finished at step {step}", 0)
        name = signal.Signals(self.signal).name
        state = f"checkpoint of step {step} committed" if saved else "no step trained in this run"
        stopped = f"stopped at step {step} of {last_step} on {name}, {state}"
        outcome_file = env.get("DEEPSUITE_OUTCOME", "")
        if outcome_file:
            if local_rank == 0:  # node-local: the batch script reads its own node's copy
                atomic_write_text(outcome_file, f"preempted {step} {name}\n")
            return Outcome(f"{stopped}; the sbatch script requeues the job or says why not", 0)
        requeued = self._agree_on(self.requeue(rank, env))
        job = env.get("SLURM_JOB_ID", "")
        if requeued:
            return Outcome(f"{stopped}; SLURM job {job} requeued, it resumes by itself", 0)
        return Outcome(f"{stopped}; not requeued: rerun the same command to resume", NOT_FINISHED)

    @staticmethod
    def _agree_on(value: bool) -> bool:
        """Rank 0's ``value`` on every rank."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])


_LISTENING: StopRequested | None = None


def listen() -> StopRequested:
    """This process's :class:`StopRequested`, recording SIGUSR1 from the first call on.

    Call it first thing in an entry point (train/train.py does, before importing torch), so a
    notice during start-up is kept and acted on before the first step.
    """
    global _LISTENING
    if _LISTENING is None:
        _LISTENING = StopRequested()
    return _LISTENING
