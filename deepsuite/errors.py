"""Errors a user can fix, and the one boundary every entry point runs in.

A :class:`DeepsuiteError` is bad input: its message names the config key, file or argument and
what was expected. :func:`run_main` turns one into a single line on stderr and exit status
:data:`EXIT_USER_ERROR` (2, as argparse uses for bad arguments), without a traceback; any other
exception is a bug and keeps its traceback. ``--debug`` on the command line or
``DEEPSUITE_DEBUG=1`` prints the traceback of known errors too.

In a distributed run every rank prints the line itself, prefixed ``[rank r]``. Where the ranks
agreed on the error (``deepsuite.distributed.agree``: validation, data preparation) a last
barrier keeps any rank from exiting before all have printed (a launcher such as torchrun stops
the other ranks as soon as one exits). Under torchrun the message is also written to the
rank's error file, so torchrun's own failure report names it.

Nothing here imports torch: the boundary looks at ``torch.distributed`` only when the command
already loaded it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence

__all__ = [
    "DEBUG_ENV",
    "EXIT_USER_ERROR",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DeepsuiteError",
    "LaunchError",
    "RankFailed",
    "debug_requested",
    "run_main",
]

EXIT_USER_ERROR = 2
DEBUG_ENV = "DEEPSUITE_DEBUG"


class DeepsuiteError(Exception):
    """Bad input the user can fix; the message names the key / file / argument and what is
    expected. Printed as one line by :func:`run_main`, never as a traceback.

    ``agreed`` is set by ``deepsuite.distributed.agree`` when every rank raised this error
    together: only then does the boundary wait for the other ranks before exiting.
    """

    agreed: bool = False


class ConfigError(DeepsuiteError, ValueError):
    """A config value or key is wrong (YAML, overrides, the DeepSpeed JSON)."""


class DataError(DeepsuiteError, ValueError):
    """A data source, field, tokenizer or split cannot give what the run needs."""


class CheckpointError(DeepsuiteError, ValueError):
    """A checkpoint or run directory to read is missing, incomplete or does not fit the config."""


class LaunchError(DeepsuiteError, ValueError):
    """The launcher's environment (ranks, world size, addresses) is inconsistent."""


class RankFailed(DeepsuiteError, RuntimeError):
    """Another rank failed with an unexpected error; its traceback is in that rank's output."""


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """``--debug`` among the arguments or ``DEEPSUITE_DEBUG`` set to a true value."""
    flag = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return flag or "--debug" in argv


def _rank_world() -> tuple[int, int]:
    """This process's rank and the world size: from the live process group when the command
    started one, else from the launcher's environment (1 process when there is none)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        rank, world = os.environ.get(rank_var, ""), os.environ.get(world_var, "")
        if rank.isdigit() and world.isdigit():
            return int(rank), int(world)
    return 0, 1


def _write_elastic_error_file(message: str) -> None:
    """torchrun gives each rank an error file (TORCHELASTIC_ERROR_FILE); with our message in it
    torchrun's failure report shows the message instead of 'To enable traceback see ...'."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)
    except OSError:
        pass  # the report only loses the message; every rank printed it anyway


def _end_together() -> None:
    """After printing an agreed error: wait until every rank has printed, then leave the
    process group (only agreed errors: every rank is then at this barrier, none elsewhere)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    except Exception:  # a peer already gone: nothing left to wait for
        pass


def report(err: DeepsuiteError, prog: str, debug: bool = False) -> int:
    """Print ``err`` as the boundary does and return :data:`EXIT_USER_ERROR`."""
    rank, world = _rank_world()
    prefix = f"[rank {rank}] " if world > 1 else ""
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    lines = str(err).strip().splitlines() or [type(err).__name__]
    text = "\n".join(f"{prefix}{prog}: error: {lines[0]}" if i == 0 else f"{prefix}  {line}"
                     for i, line in enumerate(lines))  # fmt: skip
    sys.stdout.flush()
    sys.stderr.write(text + "\n")  # one write: ranks sharing a terminal do not interleave
    sys.stderr.flush()
    _write_elastic_error_file(f"{prog}: {lines[0]}")
    if err.agreed:
        _end_together()
    return EXIT_USER_ERROR


def run_main(main: Callable[[list[str]], int | None], argv: Sequence[str], prog: str) -> int:
    """Run an entry point ``main(argv) -> exit status`` inside the error boundary.

    A :class:`DeepsuiteError` becomes one line on stderr (``prog: error: ...``, prefixed by the
    rank in a distributed run) and exit status 2; ``--debug`` (removed from ``argv`` before
    ``main`` sees it) or ``DEEPSUITE_DEBUG=1`` adds its traceback. Other exceptions propagate
    with their traceback; ``SystemExit`` (argparse's usage errors, an early-stop status such as
    75) passes through untouched, as does any status ``main`` returns.
    """
    args = list(argv)
    debug = debug_requested(args)
    args = [a for a in args if a != "--debug"]
    try:
        return int(main(args) or 0)
    except DeepsuiteError as err:
        return report(err, prog, debug)
