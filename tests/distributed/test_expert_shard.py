"""DeepSpeedMoEShard state-dict keys and MoE optimizer groups (single process, no collectives)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from deepsuite.distributed.expert_parallel import DeepSpeedMoEShard, moe_param_groups
from deepsuite.layers.moe import DeepSeekMoE, GroupedExperts


def test_state_dict_has_one_deepspeed_entry_per_local_expert_and_round_trips() -> None:
    full = GroupedExperts(6, 4, 5)
    shard = DeepSpeedMoEShard(full.slice_experts(3, 6), 6, 1, "ep_size_2")
    sd = shard.state_dict()
    assert set(sd) == {
        f"deepspeed_moe.experts.deepspeed_experts.{i}.{w}"
        for i in range(3)
        for w in ("gate_proj", "up_proj", "down_proj")
    }
    assert torch.equal(sd["deepspeed_moe.experts.deepspeed_experts.2.down_proj"], full.down_proj[5])
    other = DeepSpeedMoEShard(GroupedExperts(3, 4, 5), 6, 1, "ep_size_2")
    other.load_state_dict(sd)
    for w in ("gate_proj", "up_proj", "down_proj"):
        assert torch.equal(getattr(other, w), getattr(full, w)[3:6])
    x = torch.randn(7, 4)
    torch.testing.assert_close(
        other(x, [2, 0, 5]), full.slice_experts(3, 6).forward_reference(x, [2, 0, 5])
    )


def test_param_groups_split_decay_and_experts() -> None:
    moe = DeepSeekMoE(8, 1, 4, 2, 6)
    for p in moe.experts.parameters():
        p.allreduce, p.group_name = False, "ep_size_2"
    net = torch.nn.Sequential(torch.nn.LayerNorm(8), moe)
    groups = moe_param_groups(net, 0.1)
    by_name = {(g["name"], g.get("moe", False)): g for g in groups}
    expert_ids = {id(p) for p in moe.experts.parameters()}
    assert {id(p) for p in by_name[("ep_size_2", True)]["params"]} == expert_ids
    assert by_name[("ep_size_2", True)]["weight_decay"] == 0.1
    dense = [p for (_, is_moe), g in by_name.items() if not is_moe for p in g["params"]]
    assert {id(p) for p in dense} == {id(p) for p in net.parameters()} - expert_ids
    no_decay = by_name[("no_decay", False)]
    assert len(no_decay["params"]) == 2 and no_decay["weight_decay"] == 0.0  # LayerNorm w, b
    with pytest.raises(ValueError, match="weight_decay"):
        moe_param_groups(moe, -1.0)
