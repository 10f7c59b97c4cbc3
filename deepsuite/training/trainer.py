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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from deepsuite.atomic import atomic_write_text
from deepsuite.config import Config, load_config
from deepsuite.data.loader import model_inputs
from deepsuite.distributed.comm import guard_collectives
from deepsuite.distributed.expert_parallel import (
    moe_layers,
    sync_and_update_bias,
    verify_bias_identical,
)
from deepsuite.distributed.reshard import load_any_layout
from deepsuite.models import count_parameters
from deepsuite.training import checkpoint as ckpt
from deepsuite.training.engine import RunParts, build_run
from deepsuite.training.export import export_safetensors
from deepsuite.training.metrics import MetricsLogger
from deepsuite.training.moe_stats import (
    MoEStatsTracker,
    comm_stats,
    flops_per_token,
    max_vio,
    mfu,
)
from deepsuite.training.preemption import StopRequested
from deepsuite.training.schedule import bias_gamma


def _layer_index(name: str, n_layers: int) -> int:
    """'layers.3.ffn' -> 3; 'mtp.0.block.ffn' -> n_layers + 0 (MTP blocks follow the trunk)."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else n_layers + int(parts[1])


class Trainer:
    def __init__(self, parts: RunParts) -> None:
        self.p = parts
        self.cfg: Config = parts.cfg
        self.rank = parts.env.rank
        self.ckpt_dir = parts.run_dir / "checkpoints"
        self.step = 0
        self.tokens_seen = 0
        self.layers = [
            (_layer_index(n, self.cfg.model.n_layers), m) for n, m in moe_layers(parts.model)
        ]
        self.tracker = MoEStatsTracker(
            self.cfg.moe.n_routed_experts, window=max(10, self.cfg.logging.moe_every)
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

    # ---- checkpoints -------------------------------------------------------------------------
    def resume(self) -> None:
        how = self.cfg.train.resume
        if how == "never":
            return
        ckpt_dir = Path(how) if how != "auto" else self.ckpt_dir
        tag = [ckpt.find_resumable(ckpt_dir) if self.rank == 0 else None]
        dist.broadcast_object_list(tag, src=0)
        if tag[0] is None:
            if how != "auto":
                raise ValueError(f"train.resume: no complete checkpoint under {ckpt_dir}")
            return
        tag_dir = ckpt_dir / tag[0]
        # any EP / world / ZeRO layout: native load when it matches, else resharded on load
        load_any_layout(self.p.engine, self.p.model, ckpt_dir, tag[0])
        state = ckpt.read_trainer_state(tag_dir)
        ckpt.load_rank_state(tag_dir, self.rank)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.p.train_loader.load_state_dict(state["train_loader"])
        self.history = state.get("loss_history", [])
        verify_bias_identical(self.p.model)
        if self.rank == 0:
            print(f"resumed from {tag_dir} at step {self.step}", flush=True)

    def save(self) -> Path:
        tag = ckpt.tag_for_step(self.step)
        tag_dir = self.ckpt_dir / tag
        with guard_collectives("checkpoint", self.step):
            verify_bias_identical(self.p.model)  # the bias in the checkpoint is every rank's bias
            if self.rank == 0 and tag_dir.exists():  # a half-written save of this step, from a kill
                import shutil

                shutil.rmtree(tag_dir)
            dist.barrier()
            self.p.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, save_latest=False)
            ckpt.save_rank_state(tag_dir, self.rank)
            self._read_history()
            if self.rank == 0:
                ckpt.write_trainer_state(
                    tag_dir,
                    {
                        "step": self.step,
                        "tokens_seen": self.tokens_seen,
                        "world_size": self.p.env.world_size,
                        "train_loader": self.p.train_loader.state_dict(),
                        "loss_history": self.history,
                        "config": self.cfg.to_dict(),
                    },
                )
            dist.barrier()
            if self.rank == 0:
                ckpt.commit_latest(self.ckpt_dir, tag, self.cfg.train.keep_last)
            dist.barrier()
        return tag_dir

    # ---- one optimizer step ------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """grad_accum micro-batches, one optimizer step, one bias update; returns global metrics.

        Nothing computed on the device is read here: the losses, expert counts, bias and
        routing statistics stay device tensors in the returned metrics and in the tracker, and
        ``read_metrics`` fetches them in one transfer on the steps that log. (The all-to-all
        numbers are already on the host: the dispatcher read its split sizes.)
        """
        engine = self.p.engine
        dev = engine.device
        t = dict.fromkeys(("forward", "backward", "optimizer", "dispatch"), 0.0)
        heads = [h.name for h in self.cfg.model.aux_heads]
        # this rank's lm loss, then each auxiliary head's loss (device); expert rows received,
        # all-to-all bytes sent, all-to-all seconds (host)
        losses = torch.zeros(1 + len(heads), dtype=torch.float64, device=dev)
        comm = [0.0, 0.0, 0.0]
        start = time.perf_counter()
        for _ in range(self.p.grad_accum):
            batch = next(self.p.train_loader)
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
            losses[0] += out.lm_loss.detach().double()
            for j, name in enumerate(heads):
                losses[1 + j] += out.aux_losses[name].detach().double()
            for _, moe in self.layers:
                stats = getattr(moe.dispatcher, "last_comm_stats", None)  # set by all-to-all only
                if stats is not None:
                    comm[0] += stats.rows_received
                    comm[1] += stats.bytes_sent
                    comm[2] += stats.a2a_time_s
        t["dispatch"] = comm[2]
        counts = sync_and_update_bias(self.p.model, bias_gamma(self.tokens_seen, self.cfg.moe))
        world = self.p.env.world_size
        local = torch.cat([losses, torch.tensor(comm, dtype=torch.float64).to(dev)])
        per_rank = local.new_empty(world * local.numel())
        dist.all_gather_into_tensor(per_rank, local)
        per_rank = per_rank.view(world, local.numel())
        elapsed = time.perf_counter() - start
        n = world * self.p.grad_accum
        loss = per_rank[:, 0].sum() / n
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
            **{f"loss/aux_{name}": per_rank[:, 1 + j].sum() / n for j, name in enumerate(heads)},
        }
        if self.peak_flops > 0:
            metrics["perf/mfu"] = mfu(
                tokens / elapsed, self.flops_per_token, self.peak_flops * world
            )
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["optim/grad_norm"] = grad_norm
        if self.cfg.parallel.ep > 1:  # the straggler view: expert rows each rank computed
            c0 = 1 + len(heads)
            metrics["comm/_per_rank"] = per_rank[:, c0 : c0 + 3]
        return metrics

    def read_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """``metrics`` with every device value read (one transfer), ready for the sinks; also
        turns the loss history's pending device values into numbers."""
        self._read_history()
        tensors = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)}
        out = {k: v for k, v in metrics.items() if k not in tensors}
        if tensors:
            flat = torch.cat([v.detach().double().reshape(-1) for v in tensors.values()]).cpu()
            for k, part in zip(
                tensors, flat.split([v.numel() for v in tensors.values()]), strict=True
            ):
                out[k] = float(part[0]) if part.numel() == 1 else part
        per_rank = out.pop("comm/_per_rank", None)
        if per_rank is not None:
            per_rank = per_rank.view(-1, 3)
            out.update(
                comm_stats(
                    per_rank[:, 0].numpy(),
                    a2a_bytes=float(per_rank[:, 1].sum()),
                    a2a_time_s=float(per_rank[:, 2].max()),
                )
            )
        return out

    def _read_history(self) -> None:
        """The training losses still on the device, read in one transfer."""
        pending = [i for i, v in enumerate(self.history) if isinstance(v, torch.Tensor)]
        if pending:
            values = torch.stack([self.history[i].double() for i in pending]).cpu().tolist()
            for i, v in zip(pending, values, strict=True):
                self.history[i] = v

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and global MaxVio per MoE layer over ``eval_batches`` global batches."""
        loader = self.p.val_loader
        if loader is None:
            return {}
        engine = self.p.engine
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
        flat = flat.cpu()  # the one read of the evaluation
        out: dict[str, float] = {"loss/val": float(flat[0]) / (n * self.p.env.world_size)}
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
        jsonl = self.p.run_dir / "metrics.jsonl"
        if self.rank == 0 and jsonl.is_file():
            kept = [
                line
                for line in jsonl.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step
            ]
            atomic_write_text(jsonl, "".join(line + "\n" for line in kept))
        log = self.cfg.logging
        return MetricsLogger(
            self.p.run_dir,
            rank=self.rank,
            config=self.cfg.to_dict(),
            wandb_mode=log.wandb,
            project=log.project,
            name=log.name or None,
            group=log.group or None,
            tags=list(log.tags) or None,
            console=log.console,
            total_steps=self.cfg.train.steps,
        )

    def fit(self) -> dict[str, Any]:
        cfg, stop = self.cfg.train, StopRequested()
        self.resume()
        self.logger = self.open_logger()
        first_step = self.step
        t_start, tokens_start = time.perf_counter(), self.tokens_seen
        preempted = False
        last = min(cfg.steps, cfg.stop_at_step) if cfg.stop_at_step else cfg.steps
        while self.step < last:
            with guard_collectives("train step", self.step):
                metrics = self.train_step()
            if self.step % self.cfg.logging.moe_every == 0 or self.step == cfg.steps:
                metrics.update(self.tracker.metrics())
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                with guard_collectives("evaluate", self.step):
                    metrics.update(self.evaluate())
            if self.step % self.cfg.logging.log_every == 0 or "loss/val" in metrics:
                self.logger.log(self.read_metrics(metrics), step=self.step)
            if "loss/val" in metrics and self.cfg.logging.wandb != "disabled":
                self.logger.log_images(self.step)  # heatmaps and bias trajectories so far
            if stop.agreed():
                self.save()
                preempted = True
                stop.requeue(self.rank)  # after the save: requeueing kills this job
                break
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < last:
                self.save()
        if not preempted:
            self.save()
        if cfg.export_final and self.step == cfg.steps:
            export_safetensors(
                self.p.model, self.p.run_dir / "final" / "model.safetensors", self.rank
            )
        elapsed = time.perf_counter() - t_start
        summary = self.summary(first_step, elapsed, self.tokens_seen - tokens_start, preempted)
        self.logger.close()
        return summary

    def summary(
        self, first_step: int, elapsed: float, tokens: int, preempted: bool
    ) -> dict[str, Any]:
        self._read_history()
        vio = {
            k: v
            for k, v in self.tracker.metrics().items()
            if k.startswith("moe/") and "max_vio" in k and "layer" not in k
        }
        summary = {
            "steps": self.step,
            "steps_this_run": self.step - first_step,
            "preempted": preempted,
            "loss_first": self.history[0] if self.history else None,
            "loss_last": self.history[-1] if self.history else None,
            "val": self.last_val,
            "moe": vio,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
            "checkpoint": str(self.ckpt_dir / ckpt.tag_for_step(self.step)),
            "metrics": str(self.p.run_dir / "metrics.jsonl"),
        }
        if self.rank == 0:
            atomic_write_text(self.p.run_dir / "summary.json", json.dumps(summary, indent=1))
            print(format_summary(summary), flush=True)
        return summary


def format_summary(s: dict[str, Any]) -> str:
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
            f"train MaxVio    {s['moe']['moe/max_vio']:.3f} (last batch), {s['moe']['moe/max_vio_global']:.3f} (window)"
        )
    if s["tokens_per_s"]:
        lines.append(
            f"throughput      {s['tokens_per_s']:.0f} tokens/s over {s['steps_this_run']} steps"
        )
    lines.append(f"checkpoint      {s['checkpoint']}")
    lines.append(f"metrics         {s['metrics']}")
    if s["preempted"]:
        lines.append("stopped early on a preemption signal; rerun the same command to resume")
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


def train(cfg: Config) -> dict[str, Any]:
    trainer = Trainer(build_run(cfg))
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    config, overrides = parse_args(argv)
    cfg = load_config(config, overrides)
    train(cfg)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
