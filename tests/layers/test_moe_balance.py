"""Loss-free bias balancing, gamma schedule and balance losses."""

import pytest
import torch

from deepsuite.layers.moe import (
    DeepSeekMoE,
    GammaSchedule,
    aux_balance_loss,
    max_vio,
    sequence_balance_loss,
    sign_rule_update_,
)


def test_max_vio_hand_values():
    assert float(max_vio(torch.tensor([2, 2, 2, 2]))) == 0.0
    torch.testing.assert_close(max_vio(torch.tensor([6, 2, 2, 2])), torch.tensor(1.0))
    assert float(max_vio(torch.zeros(4, dtype=torch.int64))) == 0.0


def test_sign_rule_update_in_place_and_recenter():
    b = torch.zeros(4)
    ptr = b.data_ptr()
    sign_rule_update_(b, torch.tensor([10, 0, 5, 5]), 0.1)
    assert b.data_ptr() == ptr
    torch.testing.assert_close(b, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    sign_rule_update_(b, torch.tensor([10, 0, 0, 2]), 0.1, recenter=True)
    torch.testing.assert_close(b, torch.tensor([-0.2, 0.2, 0.1, 0.1]) - 0.05)
    with pytest.raises(TypeError, match="float32"):
        sign_rule_update_(torch.zeros(4, dtype=torch.bfloat16), torch.ones(4), 0.1)
    with pytest.raises(ValueError, match="counts_E"):
        sign_rule_update_(b, torch.ones(3), 0.1)


def test_gamma_schedule():
    s = GammaSchedule(0.001, until_tokens=1000)
    assert s(0) == 0.001 and s(999) == 0.001 and s(1000) == 0.0
    assert GammaSchedule(0.01)(10**15) == 0.01
    with pytest.raises(ValueError, match="gamma"):
        GammaSchedule(-1.0)


def test_sequence_loss_hand_case():
    # 1 sequence, 2 tokens, E=2, K=1: both tokens on expert 0 -> f = [2, 0]
    scores = torch.tensor([[[0.75, 0.25], [0.5, 0.5]]])
    ids = torch.tensor([[[0], [0]]])
    # P = mean of normalised scores = [0.625, 0.375]; L = alpha * 2 * 0.625
    torch.testing.assert_close(sequence_balance_loss(scores, ids, 0.1), torch.tensor(0.125))
    uniform = torch.full((3, 4, 8), 0.3)
    ids_u = torch.arange(8).repeat(3).view(3, 4, 2)
    torch.testing.assert_close(sequence_balance_loss(uniform, ids_u, 0.5), torch.tensor(0.5))
    # classic loss = the same formula over the whole batch
    torch.testing.assert_close(aux_balance_loss(scores[0], ids[0], 0.1), torch.tensor(0.125))
    # per sequence, then averaged: differs from the batch-wise loss when sequences differ
    s2 = torch.tensor([[[0.9, 0.1]], [[0.1, 0.9]]])
    i2 = torch.tensor([[[0]], [[1]]])
    torch.testing.assert_close(sequence_balance_loss(s2, i2, 1.0), torch.tensor(1.8))
    torch.testing.assert_close(
        aux_balance_loss(s2.view(2, 2), i2.view(2, 1), 1.0), torch.tensor(1.0)
    )


def test_counts_accumulate_in_training_only_and_update_resets():
    torch.manual_seed(0)
    m = DeepSeekMoE(8, 1, 4, 2, 6, bias_update_speed=0.01)
    x = torch.randn(3, 5, 8)
    m(x)
    c1 = m.last_stats.counts_E.clone()
    m(x)  # a second micro-batch
    assert torch.equal(m.tokens_per_expert, 2 * c1)
    m.eval()
    m(x)
    assert torch.equal(m.tokens_per_expert, 2 * c1)
    m.train()
    bias = m.router.expert_bias
    m.update_bias()
    assert m.router.expert_bias is bias  # in place
    want = 0.01 * torch.sign(2 * c1.float().mean() - 2 * c1.float())
    torch.testing.assert_close(m.state_dict()["router.expert_bias"], want)
    assert int(m.tokens_per_expert.sum()) == 0
    assert "tokens_per_expert" not in m.state_dict()
    m.update_bias(torch.tensor([0, 0, 0, 9]), gamma=0.5)  # trainer-supplied global counts
    torch.testing.assert_close(m.router.expert_bias, want + torch.tensor([0.5, 0.5, 0.5, -0.5]))


def test_bias_update_drives_max_vio_down_on_skewed_router():
    torch.manual_seed(0)
    m = DeepSeekMoE(16, 0, 16, 2, 4, bias_update_speed=0.01)
    with torch.no_grad():  # skew: a shared input direction that favours the first experts
        m.router.weight.add_(torch.linspace(1.0, -1.0, 16).unsqueeze(1) * 0.1)
    x = torch.randn(512, 16) + 0.5
    vio = []
    with torch.no_grad():
        for _ in range(151):
            m(x)
            vio.append(float(m.last_stats.max_vio))
            m.update_bias()
    assert vio[0] > 2.0, vio[0]
    assert max(vio[100:]) < 0.5, vio[100:]
    # the bias, not the weights, did it: weights of the routed tokens stay unbiased
    r = m.router(x)
    torch.testing.assert_close(r.weights_TK.sum(1), torch.ones(512))


def test_seq_aux_loss_has_gradient_to_router():
    torch.manual_seed(0)
    m = DeepSeekMoE(8, 1, 4, 2, 6, seq_aux_alpha=1e-2)
    m(torch.randn(2, 6, 8))
    assert m.aux_loss is not None
    m.aux_loss.backward()
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0
    assert DeepSeekMoE(8, 1, 4, 2, 6).aux_loss is None
