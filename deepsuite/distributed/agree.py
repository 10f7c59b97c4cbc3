"""Failing together: every rank learns of an error any rank hit, in one collective.

A rank that raises while the others go on to their next collective leaves them waiting until
the process-group timeout (or dying with "Connection closed by peer"). Wrapping a phase that
can fail on some ranks only (data preparation on rank 0, reading a file present on one node)
in :func:`fail_together` replaces the barrier at its end with one ``all_gather_object`` of
each rank's outcome: when any rank failed, every rank raises.

- A :class:`~deepsuite.errors.DeepsuiteError` (bad input) is raised on every rank with the same
  class and message, marked ``agreed`` so the entry point's error boundary prints it on every
  rank and exits them together.
- Any other exception (a bug) is re-raised with its traceback on the rank where it happened;
  the other ranks raise :class:`~deepsuite.errors.RankFailed` naming that rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

from deepsuite.errors import DeepsuiteError, RankFailed

__all__ = ["agree_on_error", "fail_together"]


def _outcome(err: BaseException | None) -> tuple[str, Any, str] | None:
    if err is None:
        return None
    if isinstance(err, DeepsuiteError):
        return ("known", type(err), str(err))
    return ("bug", type(err).__name__, str(err).strip().splitlines()[0] if str(err) else "")


def agree_on_error(err: BaseException | None, what: str) -> None:
    """Every rank passes its error of phase ``what`` (None when it had none); when any rank
    had one, every rank raises (see the module docstring). One collective; without a process
    group (one process) ``err`` is simply raised."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if err is not None:
            if isinstance(err, DeepsuiteError):
                err.agreed = True
            raise err
        return
    outcomes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, _outcome(err))
    failed = [r for r, o in enumerate(outcomes) if o is not None]
    if not failed:
        return
    first = failed[0]
    kind, cls, message = outcomes[first]
    if kind == "bug":
        if err is not None and not isinstance(err, DeepsuiteError):
            raise err  # this rank's own bug, with its traceback
        raised: DeepsuiteError = RankFailed(
            f"rank {first} failed in {what} with an unexpected error ({cls}: {message}); "
            "its traceback is in that rank's output"
        )
    else:
        if len(failed) < len(outcomes):  # some ranks passed: say which found it
            who = f"ranks {failed}" if len(failed) > 1 else f"rank {first}"
            message += f" (found by {who} in {what})"
        raised = cls(message)
    raised.agreed = True
    raise raised from err  # this rank's own error, if any, stays visible under --debug


@contextlib.contextmanager
def fail_together(what: str) -> Iterator[None]:
    """Run the block on every rank, then agree on its outcome (:func:`agree_on_error`).

    Every rank must enter the block (it ends in a collective, like a barrier)::

        with fail_together("data preparation"):
            if rank == 0:
                tokenizer = prepare_data(cfg.data, run_dir=run_dir)
    """
    err: BaseException | None = None
    try:
        yield
    except Exception as e:  # every outcome is shared, then raised
        err = e
    agree_on_error(err, what)
