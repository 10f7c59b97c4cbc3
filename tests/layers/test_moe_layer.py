"""DeepSeekMoE fast path vs the per-expert loop; experts and dispatcher vs their references."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepsuite.layers.moe import (
    DeepSeekMoE,
    ExpertRows,
    GroupedExperts,
    LocalDispatcher,
    dispatch_reference,
)


def _grads(m, x, out, g):
    params = [x, *m.parameters()]
    return torch.autograd.grad(out, params, g, allow_unused=True)


def _compare_fast_and_reference(m, x, k=None):
    out, logits = m(x, k)
    ref, ref_logits = m.forward_reference(x, k)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits)
    g = torch.randn_like(out)
    for name, a, b in zip(
        ["x", *dict(m.named_parameters())], _grads(m, x, out, g), _grads(m, x, ref, g), strict=True
    ):
        if a is None or b is None:
            assert (a is None and b is None) or torch.count_nonzero(a if b is None else b) == 0, (
                name
            )
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    return out


@pytest.mark.parametrize("score_func,n_group,topk_group", [("sigmoid", 4, 2), ("softmax", 1, 1)])
def test_fast_equals_loop_reference_outputs_and_grads(score_func, n_group, topk_group):
    torch.manual_seed(0)
    m = DeepSeekMoE(
        16,
        2,
        8,
        3,
        12,
        n_group=n_group,
        topk_group=topk_group,
        score_func=score_func,
        route_scale=2.5,
        seq_aux_alpha=0.01,
    )
    x = torch.randn(2, 9, 16, requires_grad=True)
    _compare_fast_and_reference(m, x)
    _compare_fast_and_reference(m, x, k=1)  # a smaller k at inference


def test_experts_receiving_zero_tokens():
    torch.manual_seed(0)
    m = DeepSeekMoE(16, 1, 8, 2, 12)
    with torch.no_grad():
        m.router.expert_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0]))  # all go to 0 and 1
    x = torch.randn(5, 16, requires_grad=True)
    _compare_fast_and_reference(m, x)
    assert m.last_stats.counts_E.tolist() == [5, 5, 0, 0, 0, 0, 0, 0]
    out, _ = m(x)
    out.sum().backward()
    assert torch.count_nonzero(m.experts.gate_up_proj.grad[2:]) == 0
    assert torch.count_nonzero(m.experts.gate_up_proj.grad[:2]) > 0


def test_top_p_variable_counts():
    torch.manual_seed(1)
    m = DeepSeekMoE(16, 0, 8, 4, 12, top_p=0.6, seq_aux_alpha=0.1, aux_loss_alpha=0.1)
    with torch.no_grad():
        m.router.weight.mul_(8)  # peaked scores: tokens take different numbers of experts
    x = torch.randn(3, 7, 16, requires_grad=True)
    _compare_fast_and_reference(m, x)
    n = (m.router(x.reshape(-1, 16)).ids_TK >= 0).sum(1)
    assert n.unique().numel() > 1
    assert int(m.last_stats.counts_E.sum()) == int(n.sum())
    torch.testing.assert_close(m.last_stats.experts_per_token, n.float().mean())
    assert m.aux_loss is not None and m.aux_loss.requires_grad


def test_grouped_experts_fast_equals_loop_including_empty_experts():
    torch.manual_seed(0)
    ex = GroupedExperts(5, 6, 4).double()
    counts = torch.tensor([3, 0, 4, 0, 2])
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    y, y_ref = ex(x, counts), ex.forward_reference(x, counts.tolist())
    torch.testing.assert_close(y, y_ref)
    params = [x, ex.gate_up_proj, ex.down_proj]
    g = torch.randn_like(y)
    for a, b in zip(
        torch.autograd.grad(y, params, g), torch.autograd.grad(y_ref, params, g), strict=True
    ):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda *p: ex(p[0], counts), (x,))
    with pytest.raises(ValueError, match="counts_L"):
        ex(x, [3, 0, 4, 0, 1])
    with pytest.raises(ValueError, match=r"x must be \[rows, 6\]"):
        ex(x[:, :5], counts)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_expert_rows_fused_equals_gather_compute_scatter(grouped, weighted):
    """experts(ExpertRows) == rows.scatter(experts(rows.gather())): the loop path fuses the
    gather and the weighted scatter (rows repeat tokens, some tokens unused, empty experts), with
    gradients for the source, the gate weights and the expert weights."""
    if grouped and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is not in this torch")
    torch.manual_seed(0)
    dtype = torch.float32 if grouped else torch.float64  # grouped_mm has no float64 kernel
    ex = GroupedExperts(5, 8, 4).to(dtype)  # grouped_mm wants 16-byte-aligned strides
    ex.use_grouped_mm = grouped
    counts = torch.tensor([3, 0, 4, 0, 2])
    x = torch.randn(7, 8, dtype=dtype, requires_grad=True)
    w = torch.rand(9, dtype=dtype, requires_grad=True) if weighted else None
    index = torch.tensor([0, 2, 5, 0, 1, 2, 5, 2, 0])  # token 2 three times, 3/4/6 never
    rows = ExpertRows(x, index, w)
    z = ex(rows, counts)
    assert z.shape == (7, 8)
    z_ref = ex.forward_reference(rows, counts.tolist())
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(z, rows.scatter(ex(rows.gather(), counts)))
    params = [x, ex.gate_up_proj, ex.down_proj] + ([w] if weighted else [])
    g = torch.randn_like(z)
    for a, b in zip(
        torch.autograd.grad(z, params, g), torch.autograd.grad(z_ref, params, g), strict=True
    ):
        torch.testing.assert_close(a, b)
    if not grouped:
        inputs = (x, w) if weighted else (x,)
        assert torch.autograd.gradcheck(
            lambda x, w=None: ex(ExpertRows(x, index, w), counts), inputs
        )
    with pytest.raises(ValueError, match="index_N must be a 1-D int64"):
        ex(ExpertRows(x, index.int()), counts)
    with pytest.raises(ValueError, match=r"weight_N must be a \[9\] tensor"):
        ex(ExpertRows(x, index, torch.ones(8, dtype=dtype)), counts)
    with pytest.raises(ValueError, match="counts_L"):
        ex(rows, [3, 0, 4, 0, 1])


def test_slice_experts_shares_no_storage():
    ex = GroupedExperts(6, 4, 3)
    part = ex.slice_experts(2, 5)
    assert part.n_experts == 3 and torch.equal(part.up_proj, ex.up_proj[2:5])
    with torch.no_grad():
        part.up_proj.zero_()
    assert torch.count_nonzero(ex.up_proj[2:5]) > 0
    with pytest.raises(ValueError, match="start"):
        ex.slice_experts(4, 4)


def test_layer_works_with_swapped_experts_and_dispatcher():
    """What expert parallelism does from outside: replace experts and dispatcher."""
    torch.manual_seed(0)
    m = DeepSeekMoE(8, 1, 4, 2, 6)
    x = torch.randn(10, 8)
    want, _ = m(x)
    m.experts = m.experts.slice_experts(0, 4)
    m.dispatcher = LocalDispatcher(4)
    torch.testing.assert_close(m(x)[0], want)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(0, 12), E=st.integers(1, 6), data=st.data())
def test_dispatch_combine_identity_gives_k_times_x(T, E, data):
    K = data.draw(st.integers(1, E))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    ids = (
        torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        if T
        else torch.zeros(0, K, dtype=torch.int64)
    )
    x = torch.randn(T, 3, generator=g, dtype=torch.float64)
    d = LocalDispatcher(E)
    rows, counts, state = d.dispatch(x, ids, torch.ones(T, K, dtype=torch.float64))
    x_ND = rows.gather()
    rows_ref, counts_ref = dispatch_reference(x, ids, E)
    assert torch.equal(counts, counts_ref) and torch.equal(x_ND, rows_ref)
    torch.testing.assert_close(d.combine(rows.scatter(x_ND), state), K * x)


def test_dispatch_skips_empty_slots_and_weights_get_grads():
    d = LocalDispatcher(3)
    x = torch.arange(6.0).reshape(3, 2).requires_grad_()
    ids = torch.tensor([[2, -1], [0, 2], [-1, -1]])
    w = torch.tensor([[0.5, 0.0], [0.25, 2.0], [0.0, 0.0]], requires_grad=True)
    rows, counts, state = d.dispatch(x, ids, w)
    x_ND = rows.gather()
    assert counts.tolist() == [1, 0, 2] and x_ND[:, 0].tolist() == [2.0, 0.0, 2.0]
    out = d.combine(rows.scatter(x_ND * 10), state)
    torch.testing.assert_close(out, torch.tensor([[0.0, 5.0], [45.0, 67.5], [0.0, 0.0]]))
    out.sum().backward()
    assert w.grad.tolist() == [[10.0, 0.0], [50.0, 50.0], [0.0, 0.0]]
    assert x.grad.tolist() == [[5.0, 5.0], [22.5, 22.5], [0.0, 0.0]]


def test_dispatch_combine_gradcheck_with_empty_slots():
    d = LocalDispatcher(4)
    ids = torch.tensor([[3, -1, 0], [1, 3, -1], [2, 0, 1], [-1, -1, 2]])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(4, 3, dtype=torch.float64, generator=g).masked_fill(ids < 0, 0).requires_grad_()
    m = torch.randn(8, 3, dtype=torch.float64, generator=g)  # row-wise nonlinearity stand-in

    def moe(slots: bool):
        def f(x, w):
            rows, _counts, state = d.dispatch(x, ids, w)
            if not slots:  # the generic gather / scatter-add forms (what all-to-all rows use)
                rows = rows._replace(slots=None)
            x_ND = rows.gather()
            return d.combine(rows.scatter(torch.tanh(x_ND * m[: x_ND.shape[0]])), state)

        return f

    # the atomics-free forms (by the slot map, the GPU path) equal the scatter-add forms
    torch.testing.assert_close(moe(True)(x, w), moe(False)(x, w))
    for slots in (True, False):
        assert torch.autograd.gradcheck(moe(slots), (x, w))


def test_readme_snippet_full_size_on_meta_and_small_for_real():
    from deepsuite.layers.moe import DeepSeekMoE as SeedMoE  # integrator re-exports this

    with torch.device("meta"):
        moe = SeedMoE(
            d_model=2048,
            n_shared_experts=1,
            n_routed_experts=256,
            n_expert_per_token=8,
            expert_intermediate_size=8192,
        )
    per_expert = 3 * 2048 * 8192
    assert sum(p.numel() for p in moe.parameters()) == 257 * per_expert + 256 * 2048
    small = SeedMoE(
        d_model=32,
        n_shared_experts=1,
        n_routed_experts=16,
        n_expert_per_token=4,
        expert_intermediate_size=24,
    )
    x = torch.randn(2, 5, 32)
    output, router_logits = small(x)
    assert output.shape == (2, 5, 32) and router_logits.shape == (10, 16)
    assert router_logits.dtype == torch.float32


def test_deepseek_v3_moe_layer_parameter_count_on_meta():
    with torch.device("meta"):
        moe = DeepSeekMoE(7168, 1, 256, 8, 2048, n_group=8, topk_group=4, route_scale=2.5)
    n = sum(p.numel() for p in moe.parameters())
    assert n == 257 * 3 * 7168 * 2048 + 256 * 7168  # docs/formulas.md: 11.320B per MoE layer
    assert round(n / 1e9, 3) == 11.320
    assert moe.router.expert_bias.dtype == torch.float32


def test_bf16_input_keeps_dtype_and_fp32_logits():
    torch.manual_seed(0)
    m = DeepSeekMoE(16, 1, 8, 2, 12).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    out, logits = m(x)
    assert out.dtype == torch.bfloat16 and logits.dtype == torch.float32
    assert m.router.expert_bias.dtype == torch.float32  # module casts leave the bias fp32
    ref, _ = m.forward_reference(x)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_autocast_keeps_router_float32_and_experts_in_autocast_dtype():
    torch.manual_seed(0)
    m = DeepSeekMoE(16, 1, 8, 2, 12)
    x = torch.randn(6, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, logits = m(x)
        y = m.experts(x[:4], [1, 1, 0, 2, 0, 0, 0, 0])
    assert logits.dtype == torch.float32 and y.dtype == torch.bfloat16
    torch.testing.assert_close(logits, x.detach() @ m.router.weight.detach().T)
    ref, _ = m.forward_reference(x)
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)
    out.float().sum().backward()
    assert m.experts.gate_up_proj.grad.dtype == torch.float32


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_expert_per_token"):
        DeepSeekMoE(8, 1, 4, 5, 6)
    with pytest.raises(ValueError, match="topk_group"):
        DeepSeekMoE(8, 1, 8, 2, 6, n_group=2, topk_group=3)
    with pytest.raises(ValueError, match="divisible"):
        DeepSeekMoE(8, 1, 6, 2, 6, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="seq_aux_alpha"):
        DeepSeekMoE(8, 1, 4, 2, 6, seq_aux_alpha=-1.0)
    m = DeepSeekMoE(8, 1, 4, 2, 6)
    with pytest.raises(ValueError, match=r"x must be \(B, S, 8\)"):
        m(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(8))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="k must be in"):
        m(torch.randn(2, 8), k=5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_cuda_bf16_matches_reference():
    torch.manual_seed(0)
    ex = GroupedExperts(8, 64, 32).cuda().to(torch.bfloat16)
    counts = torch.tensor([5, 0, 17, 3, 0, 40, 1, 14])
    x = torch.randn(int(counts.sum()), 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = ex(x, counts.cuda())
    y_ref = ex.forward_reference(x, counts)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    params = [x, ex.gate_up_proj, ex.down_proj]
    g = torch.randn_like(y)
    for a, b in zip(
        torch.autograd.grad(y, params, g), torch.autograd.grad(y_ref, params, g), strict=True
    ):
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)
    m = DeepSeekMoE(64, 1, 8, 2, 32).cuda().to(torch.bfloat16)
    xb = torch.randn(3, 50, 64, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(
        m(xb)[0].float(), m.forward_reference(xb)[0].float(), rtol=3e-2, atol=3e-2
    )


@pytest.mark.parametrize("grouped", [False, True])
def test_autocast_bf16_with_fp32_weights_matches_the_reference(grouped):
    """Mixed precision as trainers run it: fp32 master weights, bf16 compute under autocast.
    Both paths (the per-expert loop and torch._grouped_mm) must take bf16 copies of the weights."""
    if grouped and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is not in this torch")
    torch.manual_seed(0)
    ex = GroupedExperts(4, 32, 16)
    ex.use_grouped_mm = grouped
    counts = torch.tensor([7, 0, 12, 5])
    x = torch.randn(24, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ex(x, counts)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ex.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = ex.forward_reference(x.detach(), counts)
    torch.testing.assert_close(y.float(), ref.float(), rtol=3e-2, atol=3e-2)
