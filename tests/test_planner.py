"""Capacity planner: counts against the meta-device model and published figures, hand-worked
memory and traffic cases, balanced routing against closed forms, activations against what
autograd saves, errors that name the setting. Letters: T tokens, K slots, E experts, P ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from deepsuite.cli import main as cli_main
from deepsuite.config import load_config
from deepsuite.models import count_parameters
from deepsuite.planner import (
    SHIPPED,
    Layout,
    activation_bytes,
    balanced_rows_per_token,
    dispatcher_bytes,
    kv_cache_bytes,
    make_plan,
    model_state_bytes,
    param_breakdown,
    plan_main,
    rows_from_routing,
    sample_routing,
    zero_grad_buffer,
)
from deepsuite.planner.layout import ZeroSettings
from deepsuite.planner.memory import param_table, zero_param_groups
from deepsuite.planner.plan import resolve_vocab

CONFIGS = [path for path, *_ in SHIPPED]


@pytest.mark.parametrize("path", CONFIGS)
def test_param_counts_equal_meta_model(path: str) -> None:
    cfg = load_config(path)
    V = resolve_vocab(cfg)
    pb = param_breakdown(cfg, V)
    meta = count_parameters(cfg, vocab_size=V)
    assert (pb.total, pb.activated, pb.mtp, pb.routed_experts) == (
        meta.total,
        meta.activated,
        meta.mtp,
        meta.expert,
    )


def test_published_figures() -> None:
    v3 = param_breakdown(load_config("configs/deepseek_v3_671b.yaml"))
    assert abs(v3.total / 671.0e9 - 1) < 0.002
    assert abs(v3.activated / 37.5e9 - 1) < 0.02  # embedding and head counted (docs/formulas.md)
    lite = param_breakdown(load_config("configs/deepseek_v2_lite_16b.yaml"))
    assert abs(lite.total / 15.7e9 - 1) < 0.005
    # published "2.4B" activated counts without the embedding table: 2.45B here
    assert 2.35e9 <= lite.activated - lite.embed < 2.46e9
    one_b = param_breakdown(load_config("configs/deepseek_1b.yaml"))
    assert 0.85e9 < one_b.total < 1.15e9


def _tiny_layout(stage: int, precision: str, **zero) -> Layout:
    """tiny on 4 ranks at EP 2 (EDP 2), a 1000-element reduction bucket."""
    return Layout(
        1, 4, 2, stage, 1, 8, 4, precision, zero=ZeroSettings(reduce_bucket_size=1000, **zero)
    )


def test_model_states_by_hand() -> None:
    cfg = load_config("configs/tiny.yaml", ["model.vocab_size=257"])
    pb = param_breakdown(cfg)
    held = pb.all_dense + pb.all_experts // 2
    groups = zero_param_groups(cfg, 2)  # dense decay, dense no-decay, expert decay
    assert [e for e, _ in groups] == [False, False, True]
    sums = [sum(sizes) for _, sizes in groups]
    assert sum(sums) == held
    # ZeRO 0: unpartitioned; the foreach AdamW's square roots of one group at a time
    z0 = model_state_bytes(cfg, _tiny_layout(0, "fp32"))
    assert (z0.weights, z0.grads, z0.optimizer) == (4 * held, 4 * held, 8 * held)
    assert z0.step_temp == 4 * max(sums)
    assert z0.backward_temp == 4 * max(pb.all_dense, pb.all_experts // 2)  # the flatten
    b0 = model_state_bytes(cfg, _tiny_layout(0, "bf16"))  # fp32 master per parameter
    assert (b0.weights, b0.grads, b0.optimizer) == (2 * held, 2 * held, 12 * held)
    assert b0.step_temp == 4 * held + 4 * max(sums)  # every gradient cast to fp32, then AdamW
    # ZeRO 1/2: flat groups padded to 2 x dp and cut over dp (dense 4 ranks, experts EDP 2)
    parts = [-(-n // (2 * dp)) * 2 * dp // dp for n, dp in zip(sums, (4, 4, 2), strict=True)]
    gbuf = zero_grad_buffer(groups, _tiny_layout(2, "fp32"))
    z2 = model_state_bytes(cfg, _tiny_layout(2, "fp32"), rank=1)
    assert (z2.weights, z2.grads, z2.optimizer) == (4 * held, 4 * gbuf[1], 12 * sum(parts))
    assert z2.step_temp == max(8 * parts[0], 8 * parts[1], 4 * parts[2])
    assert z2.backward_temp == 4 * 1000 and z2.buffers == 0 and z2.backward_grads == 0
    b1 = model_state_bytes(cfg, _tiny_layout(1, "bf16"), rank=3)
    assert (b1.weights, b1.grads, b1.optimizer) == (2 * held, 2 * gbuf[3], 12 * sum(parts))
    assert b1.step_temp == max(8 * parts[0], 8 * parts[1], 6 * parts[2])
    assert b1.backward_grads == 2 * held  # ZeRO 1 reduces when backward ends: full grads then
    # forward/backward: the larger end of backward (all activations or all gradients) counts
    held_b1 = b1.weights + b1.optimizer + b1.backward_temp
    assert b1.peak_backward(10**9) == held_b1 + 10**9
    assert b1.peak_backward(0) == held_b1 + b1.grads + b1.backward_grads
    assert model_state_bytes(cfg, _tiny_layout(1, "bf16")).grads == 2 * max(gbuf)  # worst rank
    # ZeRO 3: every parameter partitioned over its own group, nothing persistent
    table = param_table(cfg)
    p3 = sum(
        -(-(p.numel // 2) // 2) if p.expert else -(-p.numel // 4) for p in table
    )  # experts: the local half of each stack over EDP 2; dense over 4 ranks
    z3 = model_state_bytes(cfg, _tiny_layout(3, "bf16", param_persistence_threshold=0))
    assert (z3.weights, z3.grads, z3.optimizer, z3.buffers) == (2 * p3, 2 * p3, 12 * p3, 2000)
    sub = max(
        sum(-(-(p.numel // 2) // 2) if p.expert else -(-p.numel // 4) for p in table
            if (p.expert, p.no_decay) == key)
        for key in {(p.expert, p.no_decay) for p in table}
    )  # fmt: skip
    assert z3.step_temp == 8 * sub  # one sub-group (here: a whole group) flattened, then AdamW
    # ... and with every parameter persistent: held whole too, released during the step
    whole = model_state_bytes(cfg, _tiny_layout(3, "bf16", param_persistence_threshold=10**9))
    assert whole.weights == 2 * (p3 + held)
    assert whole.step_temp == max(8 * sub - 2 * held, 2 * max(_module_sizes(table).values()))


def _module_sizes(table) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in table:
        out[p.module] = out.get(p.module, 0) + (p.numel // 2 if p.expert else p.numel)
    return out


def test_zero_settings_from_deepspeed_json() -> None:
    z = ZeroSettings.from_json(json.loads(Path("configs/deepspeed/zero3.json").read_text()))
    assert z.sub_group_size == 100_000_000 and z.param_persistence_threshold == 100_000
    assert z.reduce_bucket_size == 500_000_000 and z.overlap_comm is False
    # DeepSpeed's defaults, with its stage-3-only default for overlap_comm
    assert ZeroSettings.from_json({"zero_optimization": {"stage": 3}}).overlap_comm is True
    assert ZeroSettings.from_json({"zero_optimization": {"stage": 2}}).overlap_comm is False
    z1 = ZeroSettings.from_json({"zero_optimization": {"reduce_bucket_size": 5e7}})
    assert z1.reduce_bucket_size == 50_000_000


def test_grad_buffer_counts_whole_params_across_partitions() -> None:
    # one dense group [6, 4, 6] over 2 ranks: padded to 16, partitions [0, 8) and [8, 16);
    # the middle param (6..10) touches both, so rank 0 holds 6+4, rank 1 holds 4+6
    lay = Layout(1, 2, 1, 1, 1, 8, 2, "fp32")
    assert zero_grad_buffer([(False, [6, 4, 6])], lay) == [10, 10]
    assert zero_grad_buffer([(False, [3, 10, 3])], lay) == [13, 13]
    assert zero_grad_buffer([(False, [8, 8])], lay) == [8, 8]
    # expert group over EDP: world 4, ep 2 -> ranks 0, 1 are partition 0; 2, 3 partition 1
    lay4 = Layout(1, 4, 2, 1, 1, 8, 4, "fp32")
    assert zero_grad_buffer([(True, [4, 8])], lay4) == [12, 12, 8, 8]


def test_rows_and_bytes_by_hand() -> None:
    # E=8, P=4 (L=2): token 0 -> experts 0, 1 (rank 0 once); token 1 -> 2, 7 (ranks 1, 3);
    # token 2 -> 6 and an empty slot (rank 3)
    ids = torch.tensor([[0, 1], [2, 7], [6, -1]])
    assert rows_from_routing(ids, 8, 4) == [1, 1, 0, 2]
    send, recv = [1, 1, 0, 2], [3, 0, 1, 2]
    D, K, item = 16, 2, 2
    fwd, bwd = dispatcher_bytes(send, recv, D, K, item, n_local=2)
    assert fwd == 4 * (32 + 16) + 6 * 32 + 4 * (1 + 2) * 8  # the count table: P x (1 + L)
    assert bwd == 6 * (32 + 8) + 4 * 32


def _lay(ep: int, gpn: int, nodes: int = 1, m: int = 0) -> Layout:
    return Layout(nodes, gpn, ep, 1, 1, 8, nodes * gpn, "bf16", node_limit=m)


def test_balanced_rows_equal_closed_form_without_groups() -> None:
    # uniform K of E without groups: P(rank hit) = 1 - C(E - L, K) / C(E, K)
    cfg = load_config(
        "configs/tiny.yaml",
        ["moe.n_group=1", "moe.topk_group=1", "moe.n_expert_per_token=4", "parallel.ep=4"],
    )
    E, K, P = 16, 4, 4
    slots, rows, _ = balanced_rows_per_token(cfg, _lay(P, P))
    want = 1 - math.comb(E - E // P, K) / math.comb(E, K)
    torch.testing.assert_close(rows, torch.full((P,), want, dtype=torch.float64), atol=0.02, rtol=0)
    torch.testing.assert_close(
        slots, torch.full((P,), K / P, dtype=torch.float64), atol=0.03, rtol=0
    )


def test_sampled_routing_respects_group_and_node_limits() -> None:
    cfg = load_config("configs/deepseek_v3_671b.yaml", ["moe.n_group=1", "moe.topk_group=1"])
    ids = sample_routing(cfg, _lay(64, 8, nodes=8, m=2), n_tokens=2000)
    nodes = ids // 32  # 256 experts over 8 nodes
    assert max(len(set(row.tolist())) for row in nodes) <= 2
    free = sample_routing(cfg, _lay(64, 8, nodes=8, m=0), n_tokens=2000)
    assert max(len(set(row.tolist())) for row in free // 32) > 2  # the limit did something
    grouped = load_config("configs/deepseek_v3_671b.yaml")  # 8 groups, 4 kept
    g = sample_routing(grouped, _lay(64, 8, nodes=8), n_tokens=2000) // 32
    assert max(len(set(row.tolist())) for row in g) <= 4
    counts = torch.bincount(free.flatten(), minlength=256).double()
    assert (counts.max() - counts.mean()) / counts.mean() < 0.5  # balanced load


def test_node_limit_cuts_infiniband_bytes() -> None:
    cfg = load_config("configs/deepseek_v3_671b.yaml", ["moe.n_group=1", "moe.topk_group=1"])
    p0 = make_plan(cfg, 8, 8, activation_checkpointing=True)
    p2 = make_plan(cfg, 8, 8, activation_checkpointing=True, node_limit=2)
    # one InfiniBand row per (token, remote node): 8 of 256 experts free hit 8 (1 - C(224, 8) /
    # C(256, 8)) = 5.26 nodes, 4.6 of them remote; M = 2 leaves at most 2 (1.75 remote): x0.38
    node0, node2 = p0.a2a[2], p2.a2a_node_limited[2]
    assert 0.33 < node2.inter_bytes / node0.inter_bytes < 0.43
    assert p2.a2a_node_limited[1].inter_bytes < p0.a2a[1].inter_bytes
    nodup, dedup = p0.a2a[0], p0.a2a[1]
    assert dedup.total < nodup.total  # deduplication never sends more


def test_kv_cache_ratio_v3() -> None:
    mla, mha = kv_cache_bytes(load_config("configs/deepseek_v3_671b.yaml"), tokens=1)
    assert mla == 61 * 576 * 2
    assert round(mha / mla, 1) == 56.9


def _saved_bytes(cfg, tokens_BS: torch.Tensor) -> int:
    from deepsuite.models import DeepSeekLM

    torch.manual_seed(0)
    model = DeepSeekLM(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens_BS, labels=tokens_BS).loss.backward()
    return sum(seen.values())


def test_activation_estimate_against_autograd() -> None:
    cfg = load_config("configs/tiny.yaml", ["model.vocab_size=257", "data.seq_len=64"])
    lay = Layout(1, 1, 1, 0, 4, 64, 4, "fp32")
    est = activation_bytes(cfg, lay, 257).total
    got = _saved_bytes(cfg, torch.randint(0, 257, (4, 64)))
    assert abs(est - got) <= 0.25 * got, (est, got)


def test_plan_fits_and_suggestions() -> None:
    tiny = make_plan(load_config("configs/tiny.yaml"), 1, 2)
    assert tiny.fits and tiny.a2a[1].total > 0
    # the V3 shape at EP 64 with ZeRO 1 on 2048 GPUs: 17B dense parameters replicated
    v3_zero1 = make_plan(
        load_config(
            "configs/deepseek_v3_671b.yaml",
            ["train.global_batch_size=16384", "parallel.zero_stage=1",
             "parallel.deepspeed_config=configs/deepspeed/zero1.json"],
        ),
        256, 8, node_limit=4,
    )  # fmt: skip
    assert not v3_zero1.fits
    from deepsuite.planner import suggestions

    fixes = suggestions(v3_zero1)
    assert fixes and fixes[0].startswith("parallel.zero_stage=3 parallel.deepspeed_config=")


def test_v3_fits_on_32_nodes_under_zero3() -> None:
    """The shipped V3 config: EP 64 x EDP 4 on 32 x 8 GPUs of 80 GB, ZeRO 3."""
    v3 = make_plan(load_config("configs/deepseek_v3_671b.yaml"), 32, 8, node_limit=4)
    assert v3.layout.zero_stage == 3 and v3.layout.activation_checkpointing
    assert v3.fits, v3.memory_total
    st = v3.states
    # everything but the persistent norms is partitioned over 256 ranks (or EDP 4 for experts)
    assert st.weights < 2 * (v3.params.all_dense / 256 + v3.params.all_experts / 256) * 1.01
    assert st.optimizer == 6 * st.grads  # 12 bytes of fp32 master + moments, 2 of bf16 grads
    assert v3.reduce.dense_bytes > 0 and st.gathered > 0


def test_min_nodes_finds_the_fewest_and_says_what_changed(capsys) -> None:
    from deepsuite.planner import HARDWARE, min_nodes

    found = min_nodes(load_config("configs/deepseek_v3_671b.yaml"), 8, hardware=HARDWARE["h100"])
    lay = found.plan.layout
    assert found.plan.fits and lay.nodes <= 32 and lay.zero_stage == 3
    one_less = lay.nodes - 1  # nothing fits on one node fewer, in any layout tried
    assert min_nodes(
        load_config("configs/deepseek_v3_671b.yaml"), 8, hardware=HARDWARE["h100"],
        max_nodes=one_less,
    ) is None  # fmt: skip
    assert not [o for o in found.overrides if o.startswith("parallel.zero_stage")]  # its own
    from deepsuite.planner.search import _overrides

    zero1 = ["parallel.zero_stage=1", "parallel.deepspeed_config=configs/deepspeed/zero1.json"]
    said = _overrides(load_config("configs/deepseek_v3_671b.yaml", zero1), found.plan.cfg)
    assert {
        "parallel.zero_stage=3",
        "parallel.deepspeed_config=configs/deepspeed/zero3.json",
    } <= set(said)  # stage 3 is set in the YAML and the JSON together
    tiny = min_nodes(load_config("configs/tiny.yaml"), 2, hardware=HARDWARE["h100"])
    assert tiny.plan.layout.nodes == 1 and tiny.overrides == []  # its own layout is fastest
    assert plan_main(["configs/tiny.yaml", "--gpus-per-node", "2", "--min-nodes"]) == 0
    out = capsys.readouterr().out
    assert "fewest nodes: 1 x 2 GPUs" in out and "FITS" in out
    small = ["configs/tiny.yaml", "--gpus-per-node", "2", "--min-nodes", "--hbm-gb", "0.001"]
    assert plan_main([*small, "--max-nodes", "3"]) == 1
    assert "does not fit on 3 nodes of 2 GPUs in any layout" in capsys.readouterr().out
    assert plan_main([*small, "--max-nodes", "0"]) == 2


def test_plan_main_prints_and_exit_codes(capsys) -> None:
    assert plan_main(["configs/tiny.yaml", "--nodes", "1", "--gpus-per-node", "2"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "rank dedup" in out and "assumptions:" in out
    assert "inside the optimizer step" in out
    assert plan_main(["--shipped"]) == 0  # every shipped config fits its cluster
    out = capsys.readouterr().out
    assert out.count("FITS") == 4 and "gathered parameters" in out  # V3 is ZeRO 3
    v3_ep64_zero1 = [
        "configs/deepseek_v3_671b.yaml", "--nodes", "256", "train.global_batch_size=16384",
        "parallel.zero_stage=1", "parallel.deepspeed_config=configs/deepspeed/zero1.json",
    ]  # fmt: skip
    assert plan_main(v3_ep64_zero1) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "change: parallel.zero_stage=3" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["parallel.ep=32"], "parallel.ep"),  # more EP ranks than experts (config check)
        (["--gpus-per-node", "3", "parallel.ep=2"], "divisor of the world size"),
        (["--nodes", "-1"], "nodes: expected a positive int"),
        (["train.micro_batch_size=-2"], "train.micro_batch_size"),
        (["--gpus-per-node", "4", "train.global_batch_size=6", "train.micro_batch_size=1"],
         "train.global_batch_size"),
        (["--node-limit", "-1"], "node_limit"),
    ],
)  # fmt: skip
def test_nonsense_inputs_give_clear_errors(argv: list[str], needle: str, capsys) -> None:
    args = ["configs/tiny.yaml", "--gpus-per-node", "2", *argv]
    assert cli_main(["plan", *args]) == 2  # through the error boundary
    assert needle in capsys.readouterr().err


def test_layout_errors_name_the_setting() -> None:
    cfg = load_config("configs/tiny.yaml")
    with pytest.raises(ValueError, match="exceeds moe.n_routed_experts=16"):
        make_plan(_with_parallel(cfg, ep=32), 8, 4)
    with pytest.raises(ValueError, match="zero_stage"):
        make_plan(_with_parallel(cfg, zero_stage=4), 1, 2)
    with pytest.raises(TypeError, match="gpus_per_node: expected an int"):
        make_plan(cfg, 1, 2.5)  # type: ignore[arg-type]


def _with_parallel(cfg, **fields):
    """cfg with parallel.<field> set, bypassing Config.validate (which would already refuse) to
    reach the planner's own checks."""
    import dataclasses

    p = dataclasses.replace(cfg.parallel)
    for name, value in fields.items():
        object.__setattr__(p, name, value)
    c = dataclasses.replace(cfg)
    object.__setattr__(c, "parallel", p)
    return c
