"""A wandb workspace for load balance: the panels a user wants first, saved to a project.

`deepsuite workspace RUN_DIR --entity E --project P --save` reads the run's metrics.jsonl (which
MoE layers, experts and expert-parallel ranks it logged, the window length) and saves a named
workspace view of the project with wandb's own workspace API (the `wandb-workspaces` package):

  Load balance        MaxVio per layer over the window, MaxVio of one step, dead experts per
                      layer, and the load heatmaps (layers x experts; experts x steps per layer)
  Bias per expert     one line per expert per layer, and the bias heatmaps
  Load per expert     each expert's share of tokens over the window (1 = fair), per layer
  All-to-all          bytes, seconds and expert rows per rank, the straggler ratio
  Throughput          tokens/s, MFU, the losses

Every panel names keys that stay the same for the whole run (and across runs of one model
shape), so the view compares runs. Without `--save` nothing leaves the machine: the workspace
is built and checked by the same API and its panels are printed (and written as JSON with
`--json`). Per-expert panels appear when the run logged per-expert series
(`logging.expert_series_max`).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from deepsuite.runlog import layer_ids, read_metrics, window_steps
from deepsuite.training.metrics import EXPERT_SERIES_MAX, expert_series

__all__ = ["build_workspace", "workspace_main", "workspace_sections"]

_RANK_KEY = re.compile(r"^comm/rank(\d+)/")
WORKSPACE_NAME = "deepsuite: load balance"


def _line(title: str, y: list[str], ylabel: str = "") -> dict[str, Any]:
    return {"type": "line", "title": title, "y": y, "ylabel": ylabel}


def _media(title: str, keys: list[str]) -> dict[str, Any]:
    return {"type": "media", "title": title, "keys": keys}


def workspace_sections(
    records: list[dict[str, Any]], *, expert_series_max: int = EXPERT_SERIES_MAX
) -> list[dict[str, Any]]:
    """The workspace as plain data: [{"name", "panels": [{"type": "line", "title", "y",
    "ylabel"} | {"type": "media", "title", "keys"}]}]. Line panels name only keys the records
    hold; media panels the images the trainer logs to wandb (`plots/...`)."""
    layers = layer_ids(records)
    if not layers:
        raise ValueError("run_dir: no moe/layer*/load metrics in its metrics.jsonl")
    keys = {k for r in records for k in r}
    w = window_steps(records)
    win = f"the last {w} steps" if w else "the window"

    def per_layer(name: str) -> list[str]:
        return [f"moe/layer{la}/{name}" for la in layers]

    last = next(r for r in reversed(records) if f"moe/layer{layers[0]}/load" in r)
    series = sorted(expert_series(last, expert_series_max))

    def per_expert(layer: int, name: str) -> list[str]:
        return [k for k in series if k.startswith(f"moe/layer{layer}/") and k.endswith(name)]

    heatmaps = ["plots/load_layers", *[f"plots/layer{la}/load_steps" for la in layers]]
    dead = f"dead experts per MoE layer (no token in {win})"
    sections = [
        ("Load balance", [
            _line(f"MaxVio per MoE layer, over {win}", per_layer("max_vio_global"), "MaxVio"),
            _line("MaxVio per MoE layer, one step", per_layer("max_vio"), "MaxVio"),
            _line(dead, per_layer("dead_experts"), "experts"),
            _media(f"expert load / fair share over {win} (black: no token)", heatmaps),
        ]),
        ("Bias per expert", [
            *[_line(f"MoE layer {la}: bias per expert", per_expert(la, "/bias"), "bias")
              for la in layers],
            _media("bias per expert over steps", [f"plots/layer{la}/bias" for la in layers]),
        ]),
        ("Load per expert", [
            _line(f"MoE layer {la}: tokens / fair share per expert, over {win}",
                  per_expert(la, "/load_share"), "share")
            for la in layers
        ]),
    ]  # fmt: skip
    ranks = sorted({int(m.group(1)) for k in keys if (m := _RANK_KEY.match(k))})
    comm = [
        _line(f"all-to-all {what} per rank", [f"comm/rank{r}/{key}" for r in ranks], unit)
        for key, what, unit in (
            ("a2a_bytes", "bytes sent", "bytes"),
            ("a2a_time", "seconds", "s"),
            ("tokens_received", "expert rows received", "rows"),
        )
    ]
    comm.append(_line("straggler: max / mean rows received", ["comm/straggler"], "ratio"))
    sections.append(("All-to-all per rank", comm))
    losses = [k for k in ("loss/train", "loss/val") if k in keys]
    sections.append(("Throughput", [
        _line("tokens / s", ["perf/tokens_per_s"], "tokens/s"),
        _line("model FLOPs utilisation", ["perf/mfu"], "MFU"),
        _line("loss", losses, "loss"),
    ]))  # fmt: skip
    # keep what this run fills: the jsonl's keys and the per-expert series wandb gets from them
    logged = keys | set(series)
    out = []
    for name, panels in sections:
        kept = [p for p in panels if p["type"] == "media" or (p["y"] and set(p["y"]) <= logged)]
        if any(p["type"] == "line" for p in kept):
            out.append({"name": name, "panels": kept})
    return out


def build_workspace(
    sections: list[dict[str, Any]], *, entity: str, project: str, name: str = WORKSPACE_NAME
) -> Any:
    """A `wandb_workspaces.workspaces.Workspace` holding `sections` (every field checked by
    its pydantic models); `.save()` sends it to wandb."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as e:
        raise ValueError(
            f"wandb-workspaces is not importable ({e}); install it with pip install "
            "'deepsuite[wandb]' (or pip install wandb-workspaces)"
        ) from None

    def panel(p: dict[str, Any]) -> Any:
        if p["type"] == "line":
            return wr.LinePlot(title=p["title"], x="Step", y=p["y"], title_y=p["ylabel"] or None)
        return wr.MediaBrowser(title=p["title"], media_keys=p["keys"], num_columns=1)

    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=[
            ws.Section(name=s["name"], panels=[panel(p) for p in s["panels"]], is_open=True)
            for s in sections
        ],
    )


def workspace_main(argv: list[str] | None = None) -> int:
    """`deepsuite workspace RUN_DIR [--entity E --project P] [--name N] [--save] [--json F]`."""
    ap = argparse.ArgumentParser(prog="deepsuite workspace", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="run directory holding metrics.jsonl")
    ap.add_argument("--entity", default=None, help="wandb user or team (needed with --save)")
    ap.add_argument("--project", default="deepsuite", help="wandb project (logging.project)")
    ap.add_argument("--name", default=WORKSPACE_NAME, help="the saved view's name")
    ap.add_argument("--expert-series-max", type=int, default=EXPERT_SERIES_MAX,
                    help="the run's logging.expert_series_max")  # fmt: skip
    ap.add_argument("--json", default=None, help="also write the panels as JSON to this file")
    ap.add_argument("--save", action="store_true", help="save the view to wandb (needs network)")
    args = ap.parse_args(argv)
    try:
        if args.save and not args.entity:
            raise ValueError("--entity: required with --save (your wandb user or team)")
        sections = workspace_sections(
            read_metrics(args.run_dir), expert_series_max=args.expert_series_max
        )
        workspace = build_workspace(
            sections, entity=args.entity or "ENTITY", project=args.project, name=args.name
        )
    except ValueError as e:
        print(f"deepsuite workspace: {e}")
        return 2
    for s in sections:
        print(f"{s['name']}:")
        for p in s["panels"]:
            keys = p.get("y") or p.get("keys")
            print(f"  {p['title']}  [{len(keys)} key{'s' if len(keys) != 1 else ''}]")
    if args.json:
        Path(args.json).write_text(json.dumps({"name": args.name, "sections": sections}, indent=1))
    if args.save:
        workspace.save()  # prints the view's URL
    else:
        print("(not saved: add --entity E --project P --save to create the view in wandb)")
    return 0
