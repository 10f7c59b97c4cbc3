"""Node-limited routing: map the router's expert groups onto EP ranks or nodes.

Letters: E routed experts, G expert groups (moe.n_group), M = moe.topk_group (groups kept per
token), P EP ranks, g ranks per node.

EP rank r holds the contiguous experts [r*E/P, (r+1)*E/P) and the router's groups are contiguous
blocks of E/G experts, so with G = P every group is exactly one rank's experts and a token reaches
at most M ranks; with G = P / g (EP spanning P / g nodes of g ranks, consecutive ranks per node)
every group is one node's experts and a token reaches at most M nodes (DeepSeek-V3: M = 4).
Pure: no collective, so a mismatch fails on every rank before any could hang.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GroupLimit", "resolve_group_limit"]


@dataclass(frozen=True)
class GroupLimit:
    """What ``parallel.limit_groups_to`` means for this launch.

    unit: "experts" | "ranks" | "nodes"; n_group / topk_group: the router's G and M;
    n_units: EP ranks or nodes the groups map onto (0 for "experts").
    """

    unit: str
    n_group: int
    topk_group: int
    n_units: int


def resolve_group_limit(
    limit_groups_to: str,
    n_routed_experts: int,
    n_group: int,
    topk_group: int,
    ep: int,
    ranks_per_node: int,
    world_size: int,
) -> GroupLimit:
    """Check (or derive) moe.n_group against the EP placement; raise ValueError saying what to set.

    ``n_group == 1`` (no group limit configured) derives G = the number of units; any other G must
    equal it. ``ranks_per_node`` is DistEnv.local_world_size.
    """
    if limit_groups_to not in ("experts", "ranks", "nodes"):
        raise ValueError(
            f"parallel.limit_groups_to: expected 'experts', 'ranks' or 'nodes', got {limit_groups_to!r}"
        )
    for name, v in (("ep", ep), ("ranks_per_node", ranks_per_node), ("world_size", world_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if limit_groups_to == "experts":
        return GroupLimit("experts", n_group, topk_group, 0)
    if limit_groups_to == "ranks":
        units, what = ep, f"parallel.ep={ep} ranks"
    else:
        if world_size % ranks_per_node:
            raise ValueError(
                f"parallel.limit_groups_to=nodes: world size {world_size} is not a whole number "
                f"of nodes of {ranks_per_node} ranks (LOCAL_WORLD_SIZE); launch equal nodes"
            )
        if ep <= ranks_per_node:
            raise ValueError(
                f"parallel.limit_groups_to=nodes: the EP group (parallel.ep={ep}) fits on one node "
                f"of {ranks_per_node} ranks, so there is no node to limit; use 'ranks' or 'experts'"
            )
        if ep % ranks_per_node:
            raise ValueError(
                f"parallel.limit_groups_to=nodes: parallel.ep={ep} is not a multiple of the "
                f"{ranks_per_node} ranks per node, so a node's experts are not whole EP ranks"
            )
        units, what = ep // ranks_per_node, f"{ep // ranks_per_node} nodes of the EP group"
    if n_routed_experts % units:
        raise ValueError(f"moe.n_routed_experts={n_routed_experts} does not split over {what}")
    G = units if n_group == 1 else n_group
    if units != G:
        raise ValueError(
            f"parallel.limit_groups_to={limit_groups_to}: moe.n_group={n_group} but the groups must "
            f"be the experts of the {what}: set moe.n_group={units} (or 1 to derive it) and "
            f"moe.topk_group=M, or use limit_groups_to=experts (routing groups not tied to placement)"
        )
    if topk_group > G:
        raise ValueError(f"moe.topk_group: expected at most {G} ({what}), got {topk_group}")
    return GroupLimit(limit_groups_to, G, topk_group, units)
