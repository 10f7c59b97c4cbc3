"""Specialised layers as auxiliary heads on a model's (batch, seq, d) hidden states.

README_SNIPPET is pasted verbatim into README.md; this test runs that exact text.
"""

import pytest
import torch
from torch import nn

from deepsuite.layers.bottleneck import Bottleneck1d
from deepsuite.layers.dft import RDFT
from deepsuite.layers.hermite import HermiteExpansion
from deepsuite.layers.laguerre import LaguerreExpansion

README_SNIPPET = """\
import torch
from torch import nn
from deepsuite.layers.hermite import HermiteExpansion

d_model, n_aux_classes = 64, 10
hidden = torch.randn(2, 16, d_model)  # (batch, seq, d) hidden states from any model
aux_head = nn.Sequential(
    nn.LayerNorm(d_model),
    HermiteExpansion(d_model, n_aux_classes, degree=4, kind="probabilists"),  # tanh-squashed
)
aux_logits = aux_head(hidden)  # (batch, seq, n_aux_classes)
aux_targets = torch.randint(0, n_aux_classes, (2, 16))
aux_loss = nn.functional.cross_entropy(aux_logits.flatten(0, 1), aux_targets.flatten())
aux_loss.backward()
"""


def test_readme_snippet_runs_and_computes_what_it_says():
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(README_SNIPPET, "README.md", "exec"), ns)
    logits, head = ns["aux_logits"], ns["aux_head"]
    assert logits.shape == (2, 16, 10)
    # the head is LayerNorm then sum_i sum_n c[o, i, n] He_n(tanh(x_i)) + b, written out here
    h = torch.tanh(nn.functional.layer_norm(ns["hidden"], (64,)))
    he = [torch.ones_like(h), h]
    for n in range(1, 4):
        he.append(h * he[n] - n * he[n - 1])
    basis = torch.stack(he, -1)  # (2, 16, 64, 5)
    exp = head[1]
    want = torch.einsum("btin,oin->bto", basis, exp.coeffs.detach()) + exp.bias.detach()
    torch.testing.assert_close(logits.detach(), want, rtol=1e-5, atol=1e-5)
    assert exp.coeffs.grad is not None and exp.coeffs.grad.abs().sum() > 0


class _TinyLM(nn.Module):
    """Embedding + one transformer layer: stands in for a model's backbone."""

    def __init__(self, vocab: int = 16, d: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.block = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)

    def forward(self, ids):
        return self.block(self.emb(ids))  # (B, T, D)


class _ConvHead(nn.Module):
    """Bottleneck1d over the sequence axis: (B, T, D) -> (B, D, T) -> (B, T, n_out)."""

    def __init__(self, d: int, n_out: int) -> None:
        super().__init__()
        self.block = Bottleneck1d(d, d // 4)
        self.out = nn.Linear(d, n_out)

    def forward(self, h):
        return self.out(self.block(h.transpose(1, 2)).transpose(1, 2))


class _SpectralHead(nn.Module):
    """Per-sequence spectrum of the hidden states (RDFT over T) -> Laguerre expansion."""

    def __init__(self, d: int, t: int, n_out: int) -> None:
        super().__init__()
        self.dft = RDFT(t, norm="ortho")
        self.exp = LaguerreExpansion(d * (t // 2 + 1), n_out, degree=3, squash="sigmoid")

    def forward(self, h):
        mag = self.dft(h.transpose(1, 2)).abs()  # (B, D, K)
        return self.exp(mag.flatten(1))  # (B, n_out)


@pytest.mark.parametrize("head_kind", ["hermite", "bottleneck1d", "spectral"])
def test_aux_head_trains_on_hidden_states_and_reaches_the_backbone(head_kind):
    torch.manual_seed(0)
    b, t, d, vocab = 8, 12, 32, 16
    model = _TinyLM(vocab, d)
    ids = torch.randint(0, vocab, (b, t))
    if head_kind == "hermite":
        head = nn.Sequential(nn.LayerNorm(d), HermiteExpansion(d, 4, degree=3))
        target = ids % 4  # per token
    elif head_kind == "bottleneck1d":
        head = _ConvHead(d, 4)
        target = ids % 4
    else:
        head = _SpectralHead(d, t, 2)
        target = ids[:, 0] % 2  # per sequence

    def aux_loss():
        logits = head(model(ids))
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.flatten())

    first = aux_loss()
    first.backward()
    assert model.emb.weight.grad.abs().sum() > 0  # the aux signal reaches the backbone
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        loss = aux_loss()
        loss.backward()
        opt.step()
    assert aux_loss().item() < 0.5 * first.item()
