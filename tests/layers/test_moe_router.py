"""Router vs a direct, per-token Python transcription of the routing steps in docs/formulas.md."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepsuite.layers.moe import Router


def _rank(values, idx):
    """idx sorted by value descending, ties to the lower index."""
    return sorted(idx, key=lambda i: (-values[i], i))


def route_by_hand(logits, bias, k, n_group, topk_group, route_scale, score="sigmoid", norm=True):
    """docs/formulas.md "Routing" steps 1-5, one token at a time, on Python floats."""
    ids_all, w_all = [], []
    for row in logits.tolist():
        E = len(row)
        if score == "sigmoid":
            s = [1 / (1 + math.exp(-v)) for v in row]
        else:
            z = sum(math.exp(v) for v in row)
            s = [math.exp(v) / z for v in row]
        sel = [s[i] + bias[i] for i in range(E)]  # step 2: bias for selection only
        size = E // n_group
        groups = [list(range(g * size, (g + 1) * size)) for g in range(n_group)]
        gscore = [sum(sorted((sel[i] for i in grp), reverse=True)[:2]) for grp in groups]
        kept = _rank(gscore, range(n_group))[:topk_group]  # step 3
        sel_masked = [sel[i] if i // size in kept else -math.inf for i in range(E)]
        ids = _rank(sel_masked, range(E))[:k]  # step 4
        w = [s[i] for i in ids]  # unbiased
        if norm:
            w = [v / sum(w) for v in w]
        ids_all.append(ids)
        w_all.append([v * route_scale for v in w])  # step 5
    return torch.tensor(ids_all), torch.tensor(w_all, dtype=torch.float32)


def _router_with_logits(logits, bias, k, **kw):
    """A Router whose logits equal `logits` for x = identity rows (D = E)."""
    E = logits.shape[1]
    r = Router(E, E, k, **kw)
    with torch.no_grad():
        r.weight.copy_(torch.eye(E))
        r.expert_bias.copy_(torch.tensor(bias))
    return r, logits.clone()


def _check(logits, bias, k, n_group=1, topk_group=1, route_scale=1.0, score="sigmoid", norm=True):
    r, x = _router_with_logits(
        logits,
        bias,
        k,
        n_group=n_group,
        topk_group=topk_group,
        route_scale=route_scale,
        score_func=score,
        norm_topk_prob=norm,
    )
    out = r(x)
    ids, w = route_by_hand(logits, bias, k, n_group, topk_group, route_scale, score, norm)
    assert torch.equal(out.ids_TK, ids)
    torch.testing.assert_close(out.weights_TK, w)
    assert torch.equal(out.counts_E, torch.bincount(ids.flatten(), minlength=logits.shape[1]))
    torch.testing.assert_close(out.logits_TE, logits)
    return out


def test_ties_go_to_lower_index():
    logits = torch.tensor([[0.5, 0.5, 0.5, 0.5, -1.0, 2.0]])
    out = _check(logits, [0.0] * 6, k=3)
    assert out.ids_TK.tolist() == [[5, 0, 1]]


def test_dropped_groups_are_minus_inf_not_zero():
    # Negative bias makes kept-group selection scores negative; masking with 0 would pick a
    # dropped-group expert, -inf must not.
    logits = torch.tensor([[0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # s = 0.5, 0.525
    bias = [-0.6, -0.6, -0.7, -0.7, -1.0, -1.0, -1.1, -1.1]  # every s' < 0
    out = _check(logits, bias, k=3, n_group=4, topk_group=2)
    assert out.ids_TK.tolist() == [[1, 0, 2]]  # groups 0 and 1 only


def test_bias_changes_selection_but_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    no_bias = _check(logits, [0.0] * 4, k=2, route_scale=2.5)
    biased = _check(logits, [0.0, 0.0, 0.0, 2.0], k=2, route_scale=2.5)
    assert no_bias.ids_TK.tolist() == [[0, 1]]
    assert biased.ids_TK.tolist() == [[3, 0]]
    s = torch.sigmoid(logits[0])
    want = torch.stack([s[3], s[0]]) / (s[3] + s[0]) * 2.5  # from the unbiased scores
    torch.testing.assert_close(biased.weights_TK[0], want)
    torch.testing.assert_close(biased.scores_TE, torch.sigmoid(logits))


def test_softmax_without_norm_and_random_cases():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        logits = torch.randn(7, 16, generator=g)
        bias = (torch.randn(16, generator=g) * 0.1).tolist()
        _check(logits, bias, k=3, n_group=4, topk_group=2, route_scale=2.5)
        _check(logits, [0.0] * 16, k=4, score="softmax", norm=False)


def test_group_score_is_sum_of_top2():
    # group 0 has one huge expert (max wins), group 1 has two good ones (top-2 sum wins)
    logits = torch.tensor([[4.0, -4.0, 1.0, 1.0]])
    out = _check(logits, [0.0] * 4, k=1, n_group=2, topk_group=1)
    assert out.ids_TK.tolist() == [[2]]


def test_k_per_call_and_top_p():
    torch.manual_seed(0)
    r = Router(8, 16, 6, top_p=0.5)
    x = torch.randn(32, 8) * 4
    out = r(x)
    n = (out.ids_TK >= 0).sum(1)
    assert out.ids_TK.shape == (32, 6) and n.min() >= 1 and n.max() <= 6 and n.unique().numel() > 1
    s = out.scores_TE.gather(1, out.ids_TK.clamp_min(0))
    # the kept slots are the fewest candidates (by score) whose normalised mass reaches p
    full = Router(8, 16, 6)
    full.load_state_dict(r.state_dict())
    cand = full(x)
    p = cand.weights_TK  # normalised candidate scores, in descending order (bias is 0)
    need = ((p.cumsum(1) - p) < 0.5 - 1e-6).sum(1)
    assert torch.equal(n, need)
    torch.testing.assert_close(out.weights_TK.sum(1), torch.ones(32))
    assert torch.all(out.weights_TK[out.ids_TK < 0] == 0)
    assert torch.all(s[out.ids_TK >= 0] > 0)
    assert torch.equal(out.counts_E, torch.bincount(out.ids_TK[out.ids_TK >= 0], minlength=16))
    assert r(x, k=2).ids_TK.shape == (32, 2)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n_group=st.sampled_from([1, 2, 4]),
    data=st.data(),
)
def test_every_token_gets_k_distinct_experts_in_kept_groups(seed, n_group, data):
    E = 16
    topk_group = data.draw(st.integers(1, n_group))
    k = data.draw(st.integers(1, topk_group * E // n_group))
    g = torch.Generator().manual_seed(seed)
    r = Router(8, E, k, n_group=n_group, topk_group=topk_group)
    with torch.no_grad():
        r.weight.normal_(generator=g)
        r.expert_bias.normal_(generator=g).mul_(0.3)
    out = r(torch.randn(10, 8, generator=g))
    ids = out.ids_TK
    assert ids.shape == (10, k)
    assert all(len(set(row)) == k for row in ids.tolist())
    groups_used = (ids // (E // n_group)).tolist()
    assert all(len(set(row)) <= topk_group for row in groups_used)
    torch.testing.assert_close(out.weights_TK.sum(1), torch.ones(10))
    assert int(out.counts_E.sum()) == 10 * k


def test_bias_is_float32_buffer_in_state_dict():
    r = Router(4, 8, 2)
    assert "expert_bias" in r.state_dict() and r.expert_bias.dtype == torch.float32
    assert all(p is not r.expert_bias for p in r.parameters())
    r.to(torch.bfloat16)  # module casts must not make routing use a bf16 bias silently
    assert r(torch.randn(3, 4, dtype=torch.bfloat16)).scores_TE.dtype == torch.float32


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible by n_group"):
        Router(4, 10, 2, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="topk_group"):
        Router(4, 8, 2, n_group=2, topk_group=3)
    with pytest.raises(ValueError, match="n_expert_per_token"):
        Router(4, 8, 9)
    with pytest.raises(ValueError, match="n_expert_per_token"):
        Router(4, 8, 5, n_group=4, topk_group=2)  # only 4 experts reachable
    with pytest.raises(ValueError, match="score_func"):
        Router(4, 8, 2, score_func="relu")
    with pytest.raises(ValueError, match="top_p"):
        Router(4, 8, 2, top_p=1.5)
    r = Router(4, 8, 2)
    with pytest.raises(ValueError, match="k must be in"):
        r(torch.randn(3, 4), k=0)
    with pytest.raises(ValueError, match="x_TD"):
        r(torch.randn(3, 5))
    with pytest.raises(TypeError, match="floating"):
        r(torch.ones(3, 4, dtype=torch.int64))
