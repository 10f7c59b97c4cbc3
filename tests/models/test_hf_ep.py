"""Expert-parallel HF load on 2 gloo ranks: each rank reads only its experts (the other rank's
expert shard files are absent from its copy of the checkpoint) and matches one process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from deepsuite.models.hf import load_hf_model, save_hf_checkpoint, weight_map
from tests.distributed.launch import run_ranks

transformers = pytest.importorskip("transformers")


def _ep_worker(rank: int, world: int, src: str, tmp: str) -> dict:
    from deepsuite.distributed import setup_expert_parallel
    from deepsuite.distributed.expert_parallel import apply_expert_parallel
    from deepsuite.models import DeepSeekLM
    from deepsuite.models.hf import hf_to_config, load_hf_weights, read_hf_config

    cfg = hf_to_config(read_hf_config(src))
    E, L = cfg.moe.n_routed_experts, cfg.moe.n_routed_experts // world
    # this rank's view: every shard except those holding only the other rank's experts
    mine = Path(tmp) / f"rank{rank}"
    mine.mkdir()
    names = weight_map(src)
    foreign = {e for e in range(E) if not rank * L <= e < (rank + 1) * L}
    need = {f for n, f in names.items() if not any(f".experts.{e}." in n for e in foreign)}
    dropped = set(names.values()) - need
    assert dropped
    for f in set(names.values()) & need | {"config.json", "model.safetensors.index.json"}:
        os.symlink(Path(src) / f, mine / f)
    torch.manual_seed(0)
    model = DeepSeekLM(cfg).eval()
    apply_expert_parallel(model, setup_expert_parallel(world, E))
    report = load_hf_weights(model, mine)
    ids = torch.randint(
        0, cfg.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5)
    )
    with torch.no_grad():
        logits = model(ids).logits
    return {"skipped": report.skipped, "loaded": report.loaded, "logits": logits}


def test_ep_load_reads_only_local_experts_and_matches_one_process(tmp_path):
    from tests.models.test_hf import hf_v3

    _, ref = load_hf_model(hf_v3(tmp_path / "hf")[0])
    # re-save with one tensor per shard, so a missing file proves a tensor was never read
    src = save_hf_checkpoint(ref, tmp_path / "src", max_shard_bytes=1)
    assert len(set(weight_map(src).values())) == len(weight_map(src))
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref.eval()(ids).logits
    out = run_ranks(_ep_worker, 2, str(src), str(tmp_path), init="deepspeed", timeout_s=300)
    for rank, r in enumerate(out):
        lo, hi = 4 * rank, 4 * rank + 4
        ids_read = {
            int(n.split(".experts.")[1].split(".")[0]) for n in r["loaded"] if ".experts." in n
        }
        ids_skip = {int(n.split(".experts.")[1].split(".")[0]) for n in r["skipped"]}
        assert ids_read == set(range(lo, hi)) and ids_skip == set(range(8)) - ids_read
        assert (r["logits"] - want).abs().max().item() <= 1e-5
