"""Single-device, pure layers: nothing here imports torch.distributed, reads a rank or keeps globals.

Parallelism (expert sharding, all-to-all dispatch) is applied from outside by
``deepsuite.distributed``; the public names are those of the seed package, deepsuite 1.0.8 (README.md, "Layers").
"""

from deepsuite.layers.attention import (
    LatentKVCache,
    MultiHeadLatentAttention,
    RotaryPositionEmbedding,
)
from deepsuite.layers.bottleneck import Bottleneck, Bottleneck1d
from deepsuite.layers.complex import (
    ComplexBatchNorm1d,
    ComplexBatchNorm2d,
    ComplexConv1d,
    ComplexConv2d,
    ComplexConvTranspose2d,
    ComplexDropout,
    ComplexLayerNorm,
    ComplexLinear,
    CReLU,
    ModReLU,
    ZReLU,
    complex_from_polar,
    complex_magnitude,
    complex_phase,
)
from deepsuite.layers.dft import DFT, RDFT, STFT, dft_matrix
from deepsuite.layers.hermite import HermiteExpansion, HermiteLayer, hermite_basis
from deepsuite.layers.laguerre import LaguerreExpansion, LaguerreLayer, laguerre_basis
from deepsuite.layers.mlp import SwiGLU
from deepsuite.layers.moe import (
    DeepSeekMoE,
    GroupedExperts,
    LocalDispatcher,
    Router,
    RouterOutput,
    RoutingStats,
    max_vio,
)

__all__ = [
    "DFT",
    "RDFT",
    "STFT",
    "Bottleneck",
    "Bottleneck1d",
    "CReLU",
    "ComplexBatchNorm1d",
    "ComplexBatchNorm2d",
    "ComplexConv1d",
    "ComplexConv2d",
    "ComplexConvTranspose2d",
    "ComplexDropout",
    "ComplexLayerNorm",
    "ComplexLinear",
    "DeepSeekMoE",
    "GroupedExperts",
    "HermiteExpansion",
    "HermiteLayer",
    "LaguerreExpansion",
    "LaguerreLayer",
    "LatentKVCache",
    "LocalDispatcher",
    "ModReLU",
    "MultiHeadLatentAttention",
    "RotaryPositionEmbedding",
    "Router",
    "RouterOutput",
    "RoutingStats",
    "SwiGLU",
    "ZReLU",
    "complex_from_polar",
    "complex_magnitude",
    "complex_phase",
    "dft_matrix",
    "hermite_basis",
    "laguerre_basis",
    "max_vio",
]
