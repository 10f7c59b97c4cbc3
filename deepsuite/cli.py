"""The ``deepsuite`` command: one entry point, subcommands imported lazily.

deepsuite train CONFIG [key=value ...]      (under torchrun / deepspeed / accelerate / srun)
deepsuite params CONFIG [key=value ...]     parameter counts (total / activated) on the meta device
deepsuite plot RUN_DIR                      load heatmaps and bias trajectories as PNG, from the jsonl
deepsuite summary RUN_DIR                   load balance per layer, worst experts, throughput
deepsuite workspace RUN_DIR --entity E --project P --save   the load-balance wandb workspace
deepsuite plan CONFIG --nodes N --gpus-per-node G   memory / FLOPs / all-to-all per GPU
deepsuite convert ...                       Hugging Face DeepSeek-V2/V3 <-> deepsuite
deepsuite eval PATH --data SOURCE           loss, perplexity, expert load (any ranks, any EP)
deepsuite generate PATH --prompt TEXT       greedy or sampled text from a checkpoint, streamed
deepsuite reshard SRC DST --ep N            re-split a checkpoint to another EP size
deepsuite torchrun [torchrun args] train/train.py CONFIG ...   torchrun, ending in one line

Every subcommand runs inside the error boundary (:func:`deepsuite.errors.run_main`): bad input
ends in one line naming the key or file and exit status 2, no traceback (``--debug`` or
DEEPSUITE_DEBUG=1 shows it). A new subcommand is one row of ``COMMANDS``: a function taking
argv and returning the exit status, raising :class:`deepsuite.errors.DeepsuiteError` for bad
input.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module

from deepsuite.errors import EXIT_USER_ERROR, ConfigError, debug_requested, run_main

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
    "eval": ("deepsuite.training.evaluate", "eval_main", "loss / perplexity / load on a dataset"),
    "generate": ("deepsuite.cli", "generate_main", "generate text from a checkpoint"),
    "torchrun": ("deepsuite.cli", "torchrun_main", "torchrun, ending a failed run in one line"),
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


def _generate_args(argv: list[str] | None):
    import argparse

    p = argparse.ArgumentParser(
        prog="deepsuite generate",
        description="Generate text from a Hugging Face DeepSeek dir, a deepsuite export or run, "
        "with MLA's latent KV cache (greedy at --temperature 0).",
    )
    p.add_argument("path")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--tokenizer", default=None, help="default: the one saved beside PATH")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--ids", action="store_true", help="print the new token ids, not text")
    return p.parse_args(argv)


class _Stream:
    """Prints one row's completion as it grows (decoding the whole completion each time, so
    byte-level pieces of one character print together)."""

    def __init__(self, tok, eos: int) -> None:
        self.tok, self.eos, self.ids, self.shown = tok, eos, [], ""

    def __call__(self, new: list[int | None]) -> None:
        if new[0] is None or new[0] == self.eos:
            return
        self.ids.append(new[0])
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for its next bytes
            return
        print(text[len(self.shown) :], end="", flush=True)
        self.shown = text


def generate_main(argv: list[str] | None = None) -> int:
    """``deepsuite generate``; bad input raises a DeepsuiteError (one line, exit 2 from the
    boundary)."""
    import torch

    from deepsuite.checkpoint.pretrained import load_pretrained
    from deepsuite.data import ByteTokenizer, load_hf_tokenizer
    from deepsuite.data.tokenizer import render_chat
    from deepsuite.models.generate import SamplingConfig, generate

    args = _generate_args(argv)
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    src, model = load_pretrained(args.path, dtype=dtype)
    spec = args.tokenizer or src.tokenizer
    if spec is None:
        raise ConfigError(f"--tokenizer: {args.path} has no tokenizer.json beside it; name one")
    tok = ByteTokenizer() if spec == "byte" else load_hf_tokenizer(spec)
    if tok.vocab_size > model.args.model.vocab_size:
        raise ConfigError(
            f"--tokenizer: {spec} has {tok.vocab_size} tokens, more than the model's "
            f"vocabulary (model.vocab_size={model.args.model.vocab_size})"
        )
    texts = [
        render_chat(tok, [{"role": "user", "content": p}], add_generation_prompt=True)
        if args.chat
        else p
        for p in args.prompt
    ]
    # every document the data pipeline packs opens with the separator: so does a prompt
    prompts = [[tok.eos_id, *tok.encode(t)] for t in texts]
    sampling = SamplingConfig(**{**sampling.__dict__, "eos_id": tok.eos_id})
    stream = len(prompts) == 1 and not args.ids
    out = generate(
        model,
        prompts,
        sampling,
        pad_id=tok.eos_id,
        on_step=_Stream(tok, tok.eos_id) if stream else None,
    )
    if stream:
        print(flush=True)
        return 0
    for i, ids in enumerate(out):
        body = (
            " ".join(map(str, ids)) if args.ids else tok.decode([t for t in ids if t != tok.eos_id])
        )
        print(body if len(out) == 1 else f"[{i}] {body}", flush=True)
    return 0


def torchrun_main(argv: list[str] | None = None) -> int:
    """``deepsuite torchrun ARGS``: torchrun itself (the same arguments, ``torch.distributed.run``),
    but a failure ends without torchrun's own traceback.

    When the first rank to fail exited with status 2 (bad input: every rank has printed the
    line naming it) or 75 (stopped early with a checkpoint and not requeued: rank 0 has said
    so, ``training.preemption.NOT_FINISHED``) nothing more is printed and that status is the
    command's; any other failure prints torchrun's failure table (ranks, exit codes, error
    files) and exits 1, as torchrun does.
    torchrun's log lines (the OMP_NUM_THREADS notice, 'Sending process ... SIGTERM') are shown
    only with ``--debug`` / DEEPSUITE_DEBUG=1.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from deepsuite.training.preemption import NOT_FINISHED

    args = list(sys.argv[1:] if argv is None else argv)
    if not debug_requested(args):
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
        logging.getLogger("torch.distributed.run").setLevel(logging.CRITICAL)
    try:
        run(parse_args(args))
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        if first.exitcode in (EXIT_USER_ERROR, NOT_FINISHED):
            return first.exitcode
        print(err.format_msg(), file=sys.stderr, flush=True)
        return 1
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
        print(f"deepsuite: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return run_command(name, rest)


def run_command(name: str, argv: list[str], prog: str | None = None) -> int:
    """Subcommand ``name`` with ``argv`` inside the error boundary; returns the exit status."""
    module, func, _ = COMMANDS[name]
    if name == "torchrun":  # its arguments are torchrun's (the script's --debug included)
        return torchrun_main(argv)

    def call(args: list[str]) -> int:
        fn: Callable[[list[str]], int] = getattr(import_module(module), func)
        return int(fn(args) or 0)

    return run_main(call, argv, prog or f"deepsuite {name}")


if __name__ == "__main__":
    sys.exit(main())
