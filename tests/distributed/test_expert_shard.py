"""DeepSpeedMoEShard state-dict keys and MoE optimizer groups (single process, no collectives)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from deepsuite.distributed.expert_parallel import moe_param_groups
from deepsuite.distributed.expert_shard import DeepSpeedMoEShard
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


def test_zero3_shard_tags_its_placement_and_keeps_stacked_keys() -> None:
    """The ZeRO-3 form: plain module (not DeepSpeed's MoE), every parameter placed over its
    expert-data-parallel group, also after ``to_empty`` replaces the Parameter objects."""
    from deepspeed.moe.layer import MoE

    from deepsuite.distributed.expert_shard import ExpertShard

    full = GroupedExperts(6, 4, 5)
    edp = object()  # stands for the process group: tagging only stores it
    shard = ExpertShard(full.slice_experts(3, 6), 6, 1, "ep_size_2", edp)
    assert not isinstance(shard, MoE)
    assert set(shard.state_dict()) == {f"local.{w}" for w in ("gate_proj", "up_proj", "down_proj")}
    for module in (shard, shard.to_empty(device="cpu")):
        for p in module.parameters():
            assert p.allreduce is False and p.group_name == "ep_size_2"
            assert p.ds_zero_partition_process_group is edp
            assert p.ds_zero_partition_group_name == "ep_size_2"
            assert p.ds_zero_placement_family == "autoep_expert"
    with pytest.raises(ValueError, match="edp_group"):
        ExpertShard(full.slice_experts(3, 6), 6, 1, "ep_size_2", None)
    dense = DeepSpeedMoEShard(full.slice_experts(3, 6), 6, 1, "ep_size_2")
    assert not any(hasattr(p, "ds_zero_placement_family") for p in dense.parameters())
