"""The training loop: step -> balance update -> metrics -> eval -> checkpoint.

One optimizer step runs ``grad_accum`` micro-batches through the DeepSpeed engine, then sums every
MoE layer's token counts over all ranks and micro-batches in one all-reduce and moves the balancing
bias once (identically on every rank). Launch with torchrun, the deepspeed launcher, accelerate or
srun; the environment each sets is read by ``deepsuite.distributed.detect_env``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from deepsuite.atomic import atomic_write_text
from deepsuite.checkpoint.export import export_safetensors
from deepsuite.checkpoint.layout import tag_for_step
from deepsuite.checkpoint.run import TrainerState, resume_run, save_run
from deepsuite.config import Config, load_config
from deepsuite.data.loader import model_inputs
from deepsuite.distributed.comm import guard_collectives
from deepsuite.distributed.expert_parallel import (
    moe_layers,
    sync_and_update_bias,
)
from deepsuite.errors import run_main
from deepsuite.models import count_parameters
from deepsuite.runlog import JSONL_NAME, keep_steps_up_to
from deepsuite.training import preemption
from deepsuite.training.engine import RunParts, build_run
from deepsuite.training.metrics import MetricsLogger
from deepsuite.training.moe_alerts import BalanceAlerts
from deepsuite.training.moe_stats import (
    MoEStatsTracker,
    comm_stats,
    flops_per_token,
    max_vio,
    mfu,
)
from deepsuite.training.step_stats import StepStats


def _layer_index(name: str, n_layers: int) -> int:
    """'layers.3.ffn' -> 3; 'mtp.0.block.ffn' -> n_layers + 0 (MTP blocks follow the trunk)."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else n_layers + int(parts[1])


class Trainer:
    """One run's loop over the pieces :func:`~deepsuite.training.engine.build_run` made."""

    def __init__(self, parts: RunParts) -> None:
        self.cfg: Config = parts.cfg
        self.env = parts.env
        self.rank = parts.env.rank
        self.world = parts.env.world_size
        self.run_dir = parts.run_dir
        self.engine = parts.engine
        self.model = parts.model
        self.train_loader = parts.train_loader
        self.val_loader = parts.val_loader
        self.grad_accum = parts.grad_accum
        self.ckpt_dir = parts.run_dir / "checkpoints"
        self.step = 0
        self.tokens_seen = 0
        self.gamma = self.cfg.moe.gamma_schedule()
        self.layers = [
            (_layer_index(n, self.cfg.model.n_layers), m) for n, m in moe_layers(parts.model)
        ]
        log = self.cfg.logging
        self.tracker = MoEStatsTracker(self.cfg.moe.n_routed_experts, window=log.moe_window_steps)
        self.alerts = BalanceAlerts(
            dead_steps=log.alert_dead_steps,
            max_vio=log.alert_max_vio,
            after_steps=log.alert_after_steps,
        )
        self.history: list[float | torch.Tensor] = []  # device values until read (logging)
        self.last_val: dict[str, float] = {}
        self.peak_flops = self.cfg.logging.peak_tflops * 1e12
        m, a = self.cfg.model, self.cfg.mla
        active = count_parameters(self.cfg).activated - m.vocab_size * m.dim  # embedding: a lookup
        self.flops_per_token = flops_per_token(
            active,
            n_layers=m.n_layers,
            seq_len=self.cfg.data.seq_len,
            attn_dim=m.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim),
        )

    # ---- checkpoints (the sequences live in deepsuite.checkpoint.run) ------------------------
    def resume(self) -> None:
        state = resume_run(
            self.engine, self.model, self.cfg.train.resume, self.ckpt_dir, rank=self.rank
        )
        if state is None:
            return
        self.step, self.tokens_seen = state.step, state.tokens_seen
        self.train_loader.load_state_dict(state.train_loader)
        self.history = state.loss_history
        if state.metrics_window:  # absent in checkpoints written before it was saved
            self.tracker.load_state_dict(state.metrics_window["moe"])
            self.alerts.load_state_dict(state.metrics_window["alerts"])

    def save(self) -> Path:
        self._read([])  # the losses still on the device, as numbers in the checkpoint
        state = TrainerState(
            step=self.step,
            tokens_seen=self.tokens_seen,
            world_size=self.world,
            train_loader=self.train_loader.state_dict(),
            config=self.cfg.to_dict(),
            loss_history=self.history,
            metrics_window={
                "moe": self.tracker.state_dict(),
                "alerts": self.alerts.state_dict(),
            },
        )
        return save_run(
            self.engine,
            self.model,
            self.ckpt_dir,
            state,
            rank=self.rank,
            keep_last=self.cfg.train.keep_last,
        )

    # ---- one optimizer step ------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """grad_accum micro-batches, one optimizer step, one bias update; returns global metrics.

        Nothing computed on the device is read here: the losses, expert counts, bias and
        routing statistics stay device tensors in the returned metrics and in the tracker, and
        :meth:`read_metrics` fetches them in one transfer on the steps that log. (The
        all-to-all numbers are host numbers already: the dispatcher read its split sizes.) Every
        collective of the step (bias counts, statistics) runs on tensors on the engine's
        device, as nccl requires.
        """
        engine, heads = self.engine, [h.name for h in self.cfg.model.aux_heads]
        dev = engine.device
        t = dict.fromkeys(("forward", "backward", "optimizer", "dispatch"), 0.0)
        mine = StepStats(heads, device=dev)
        start = time.perf_counter()
        for _ in range(self.grad_accum):
            batch = next(self.train_loader)
            t0 = time.perf_counter()
            out = engine(**model_inputs(batch, dev, self.cfg.data.document_masking))
            t1 = time.perf_counter()
            engine.backward(out.loss)
            t2 = time.perf_counter()
            engine.step()
            t3 = time.perf_counter()
            t["forward"] += t1 - t0
            t["backward"] += t2 - t1
            t["optimizer"] += t3 - t2
            mine.add("lm_loss", out.lm_loss.detach().double())
            for name in heads:
                mine.add(f"aux/{name}", out.aux_losses[name].detach().double())
            for _, moe in self.layers:
                comm = getattr(moe.dispatcher, "last_comm_stats", None)  # all-to-all only
                if comm is not None:
                    mine.add("rows_received", comm.rows_received)
                    mine.add("a2a_bytes", comm.bytes_sent)
                    mine.add("a2a_time_s", comm.a2a_time_s)
        t["dispatch"] = mine.host("a2a_time_s")
        counts = sync_and_update_bias(self.model, self.gamma(self.tokens_seen))
        ranks = mine.all_gather()
        elapsed = time.perf_counter() - start
        n_micro = self.world * self.grad_accum
        loss = ranks.sum("lm_loss") / n_micro
        tokens = self.cfg.train.global_batch_size * self.cfg.data.seq_len
        self.tokens_seen += tokens
        self.step += 1
        self.history.append(loss)
        for (layer, moe), c in zip(self.layers, counts.values(), strict=True):
            stats = moe.last_stats
            self.tracker.update(
                layer,
                c,
                moe.router.expert_bias,
                entropy=None if stats is None else stats.entropy,
                seq_aux_loss=None if stats is None else stats.seq_aux_loss,
            )
        metrics: dict[str, Any] = {
            "loss/train": loss,
            "optim/lr": engine.get_lr()[0],
            "perf/tokens_per_s": tokens / elapsed,
            "perf/step_time_s": elapsed,
            "perf/tokens_seen": self.tokens_seen,
            **{f"time/{k}": v for k, v in t.items()},
            **{f"loss/aux_{name}": ranks.sum(f"aux/{name}") / n_micro for name in heads},
        }
        if self.peak_flops > 0:
            metrics["perf/mfu"] = mfu(
                tokens / elapsed, self.flops_per_token, self.peak_flops * self.world
            )
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["optim/grad_norm"] = grad_norm
        if self.cfg.parallel.ep > 1:  # the straggler view: expert rows each rank computed
            fields = ("rows_received", "a2a_bytes", "a2a_time_s")
            metrics["comm/_per_rank"] = torch.stack([ranks.per_rank(f) for f in fields], dim=1)
        return metrics

    def read_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """``metrics`` with every device value read, together with the loss history's (one
        transfer), ready for the sinks."""
        tensors = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)}
        out = {k: v for k, v in metrics.items() if k not in tensors}
        for k, v in zip(tensors, self._read(list(tensors.values())), strict=True):
            out[k] = v[0] if len(v) == 1 else v
        per_rank = out.pop("comm/_per_rank", None)
        if per_rank is not None:
            per_rank = np.asarray(per_rank).reshape(-1, 3)
            out.update(
                comm_stats(
                    per_rank[:, 0],
                    a2a_bytes=float(per_rank[:, 1].sum()),
                    a2a_time_s=float(per_rank[:, 2].max()),
                    a2a_bytes_R=per_rank[:, 1],
                    a2a_time_R=per_rank[:, 2],
                )
            )
        return out

    def _read(self, tensors: list[torch.Tensor]) -> list[list[float]]:
        """``tensors`` as flat lists of numbers, read in one transfer together with the training
        losses the history still holds on the device (which become numbers)."""
        pending = [i for i, v in enumerate(self.history) if isinstance(v, torch.Tensor)]
        parts = [v.detach().double().reshape(-1) for v in tensors]
        parts += [self.history[i].detach().double().reshape(1) for i in pending]
        if not parts:
            return []
        dev = parts[0].device
        flat = torch.cat([p.to(dev) for p in parts]).cpu().tolist()  # the one transfer
        values, start = [], 0
        for p in parts:
            values.append(flat[start : start + p.numel()])
            start += p.numel()
        for i, v in zip(pending, values[len(tensors) :], strict=True):
            self.history[i] = v[0]
        return values[: len(tensors)]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and global MaxVio per MoE layer over ``eval_batches`` global batches."""
        loader = self.val_loader
        if loader is None:
            return {}
        engine = self.engine
        engine.eval()
        dev = engine.device
        loss_sum = torch.zeros((), device=dev)
        counts = [
            torch.zeros(m.n_routed_experts, dtype=torch.int64, device=dev) for _, m in self.layers
        ]
        n = 0
        for batch in loader:
            if n == self.cfg.train.eval_batches:
                break
            out = engine(**model_inputs(batch, dev, self.cfg.data.document_masking))
            loss_sum += out.lm_loss.float()
            for c, (_, m) in zip(counts, self.layers, strict=True):
                c += m.last_stats.counts_E
            n += 1
        engine.train()
        flat = torch.cat([loss_sum.view(1).double(), *[c.double() for c in counts]])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.cpu().numpy()  # the one read of the evaluation
        out: dict[str, float] = {"loss/val": float(flat[0]) / (n * self.world)}
        offset = 1
        for layer, m in self.layers:
            c = flat[offset : offset + m.n_routed_experts]
            offset += m.n_routed_experts
            out[f"moe/layer{layer}/val_max_vio_global"] = max_vio(c)
        if self.layers:
            vals = [v for k, v in out.items() if k.endswith("val_max_vio_global")]
            out["moe/val_max_vio_global"] = sum(vals) / len(vals)
        self.last_val = out
        return out

    # ---- the loop ----------------------------------------------------------------------------
    def open_logger(self) -> MetricsLogger:
        """After resume: steps past the checkpoint (trained before a crash) leave the jsonl, so
        every step appears once and the resumed steps are logged afresh."""
        if self.rank == 0:
            keep_steps_up_to(self.run_dir / JSONL_NAME, self.step)
        log = self.cfg.logging
        return MetricsLogger(
            self.run_dir,
            rank=self.rank,
            config=self.cfg.to_dict(),
            wandb_mode=log.wandb,
            project=log.project,
            name=log.name or None,
            group=log.group or None,
            tags=list(log.tags) or None,
            console=log.console,
            total_steps=self.cfg.train.steps,
            expert_series_max=log.expert_series_max,
        )

    def fit(self) -> dict[str, Any]:
        cfg, stop = self.cfg.train, preemption.listen()
        stop.listen_for_term()
        self.resume()
        self.logger = self.open_logger()
        first_step = self.step
        t_start, tokens_start = time.perf_counter(), self.tokens_seen
        last = min(cfg.steps, cfg.stop_at_step) if cfg.stop_at_step else cfg.steps
        preempted = stop.agreed()  # a notice during start-up: stop before the first step
        while self.step < last and not preempted:
            with guard_collectives("train step", self.step):
                metrics = self.train_step()
            self.log_step(metrics, last=self.step == last)
            if stop.agreed():
                preempted = self.step < last  # a notice at the last step changes nothing
                break
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < last:
                self.save()
        # no step since the start or the resume: that state is already the latest checkpoint
        saved = not preempted or self.step > first_step
        if saved:
            self.save()
        outcome = stop.conclude(
            step=self.step,
            last_step=last,
            saved=saved,
            rank=self.rank,
            local_rank=self.env.local_rank,
        )
        if cfg.export_final and self.step == cfg.steps:
            export_safetensors(self.model, self.run_dir / "final" / "model.safetensors", self.rank)
        elapsed = time.perf_counter() - t_start
        result = self.fit_result(first_step, elapsed, self.tokens_seen - tokens_start, preempted)
        result["outcome"], result["exit_code"] = outcome.line, outcome.exit_code
        self.logger.close()
        if self.rank == 0:
            print(outcome.line, flush=True)
        return result

    def log_step(self, metrics: dict[str, Any], *, last: bool) -> None:
        """Alerts, the MoE window metrics every ``moe_every`` steps, evaluation, the log line,
        and the heatmaps for wandb every ``images_every`` steps and at the end.

        Only the steps that log read the device (the step's metrics in one transfer, the
        tracker's in one more), so alerts are checked on those steps: every step with the default
        ``log_every=1``. The tracker counts every step on the device (window and runs without a
        token), so what a check sees does not depend on how often it runs."""
        cfg, log, step = self.cfg.train, self.cfg.logging, self.step
        moe_step = step % log.moe_every == 0 or step == cfg.steps
        eval_step = bool(cfg.eval_every) and (step % cfg.eval_every == 0 or step == cfg.steps)
        if step % log.log_every == 0 or moe_step or eval_step:
            for alert in self.alerts.check(self.tracker, step):
                self.logger.alert(alert.title, alert.text)
            if moe_step:
                metrics.update(self.tracker.metrics())
            if eval_step:
                with guard_collectives("evaluate", step):
                    metrics.update(self.evaluate())
            if step % log.log_every == 0 or moe_step or "loss/val" in metrics:
                self.logger.log(self.read_metrics(metrics), step=step)
        # other steps read nothing: their values stay on the device (the loss in the history)
        if log.wandb != "disabled" and (
            last or (log.images_every and step % log.images_every == 0)
        ):
            self.logger.log_images(step)  # drawn from the jsonl on rank 0

    def fit_result(
        self, first_step: int, elapsed: float, tokens: int, preempted: bool
    ) -> dict[str, Any]:
        """What this invocation did; rank 0 writes it to RUN_DIR/summary.json and prints it."""
        self._read([])
        vio = {
            k: v
            for k, v in self.tracker.metrics().items()
            if k.startswith("moe/") and "max_vio" in k and "layer" not in k
        }
        if vio:
            vio["moe/window_steps"] = self.tracker.window_steps
        result = {
            "steps": self.step,
            "steps_this_run": self.step - first_step,
            "preempted": preempted,
            "loss_first": self.history[0] if self.history else None,
            "loss_last": self.history[-1] if self.history else None,
            "val": self.last_val,
            "moe": vio,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
            "checkpoint": str(self.ckpt_dir / tag_for_step(self.step)),
            "metrics": str(self.run_dir / JSONL_NAME),
        }
        if self.rank == 0:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(result, indent=1))
            print(format_fit_result(result), flush=True)
        return result


def format_fit_result(s: dict[str, Any]) -> str:
    """The end-of-run report printed by rank 0 (``deepsuite summary RUN_DIR`` reads the jsonl
    instead and is :func:`deepsuite.summary.format_summary`)."""
    lines = ["", "=== deepsuite run summary ==="]
    if s["loss_first"] is not None:
        lines.append(
            f"loss            {s['loss_first']:.4f} (first step) -> {s['loss_last']:.4f} (step {s['steps']})"
        )
    if s["val"].get("loss/val") is not None:
        lines.append(f"val loss        {s['val']['loss/val']:.4f}")
    if "moe/val_max_vio_global" in s["val"]:
        lines.append(
            f"val MaxVio      {s['val']['moe/val_max_vio_global']:.3f} (global, mean over MoE layers)"
        )
    if "moe/max_vio" in s["moe"]:
        lines.append(
            f"train MaxVio    {s['moe']['moe/max_vio']:.3f} (last batch), {s['moe']['moe/max_vio_global']:.3f} (window of the last {s['moe']['moe/window_steps']} steps)"
        )
    if s["tokens_per_s"]:
        lines.append(
            f"throughput      {s['tokens_per_s']:.0f} tokens/s over {s['steps_this_run']} steps"
        )
    lines.append(f"checkpoint      {s['checkpoint']}")
    lines.append(f"metrics         {s['metrics']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[str, list[str]]:
    parser = argparse.ArgumentParser(
        prog="deepsuite train",
        description="Train a DeepSeek-style MoE LM (launch under torchrun / deepspeed / accelerate / srun).",
    )
    parser.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=50")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    return args.config, args.overrides


def train(cfg: Config | Callable[[], Config]) -> dict[str, Any]:
    """Build the run (``cfg`` or a function loading it: see ``build_run``) and train."""
    trainer = Trainer(build_run(cfg))
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    """0 when the run finished (or was requeued), preemption.NOT_FINISHED when it stopped early."""
    preemption.listen()  # a notice during start-up is kept (train/train.py calls it even earlier)
    config, overrides = parse_args(argv)
    # loaded inside the run: its errors are agreed on by every rank like any other
    summary = train(lambda: load_config(config, overrides))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return int(summary["exit_code"])


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], "deepsuite train"))
