"""The ``deepsuite`` command: one entry point, subcommands imported lazily.

deepsuite train CONFIG [key=value ...]      (under torchrun / deepspeed / accelerate / srun)
deepsuite params CONFIG [key=value ...]     parameter counts (total / activated) on the meta device
deepsuite plot RUN_DIR                      load heatmaps and bias trajectories as PNG, from the jsonl
deepsuite summary RUN_DIR                   load balance per layer, worst experts, throughput
deepsuite workspace RUN_DIR --entity E --project P --save   the load-balance wandb workspace
deepsuite plan CONFIG --nodes N --gpus-per-node G   memory / FLOPs / all-to-all per GPU
deepsuite convert ...                       Hugging Face DeepSeek-V2/V3 <-> deepsuite
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module

# subcommand -> (module, function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("deepsuite.training.trainer", "main", "train a model (launch under torchrun etc.)"),
    "params": ("deepsuite.cli", "params_main", "count parameters of a config"),
    "plot": ("deepsuite.plotting", "plot_main", "write load-balance PNGs for a run directory"),
    "summary": ("deepsuite.summary", "summary_main", "summarise a finished run"),
    "workspace": (
        "deepsuite.training.wandb_workspace",
        "workspace_main",
        "save the load-balance wandb workspace for a run's project",
    ),
    "plan": ("deepsuite.planner", "plan_main", "capacity plan: memory, FLOPs, communication"),
    "convert": ("deepsuite.models.hf", "hf_main", "convert Hugging Face DeepSeek checkpoints"),
    "reshard": (
        "deepsuite.checkpoint.convert",
        "reshard_main",
        "re-split a checkpoint to another EP size",
    ),
}


def params_main(argv: list[str] | None = None) -> int:
    import argparse

    from deepsuite.config import load_config
    from deepsuite.models import count_parameters

    parser = argparse.ArgumentParser(
        prog="deepsuite params", description="Parameter counts of a config."
    )
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--vocab-size", type=int, default=None, help="when model.vocab_size is 0")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    vocab = args.vocab_size or cfg.model.vocab_size or 257
    print(f"{cfg.name}: {count_parameters(cfg, vocab_size=vocab)}")
    return 0


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items())
    return f"usage: deepsuite COMMAND [ARGS]\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"deepsuite: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    fn: Callable[[list[str]], int] = getattr(import_module(module), func)
    return int(fn(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
