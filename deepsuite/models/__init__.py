"""DeepSeek-style language models assembled from ``deepsuite.layers``."""

from deepsuite.models.deepseek import IGNORE_INDEX, Block, DeepSeekLM, LMOutput, MTPModule
from deepsuite.models.params import ParamCount, count_model_parameters, count_parameters

__all__ = [
    "IGNORE_INDEX",
    "Block",
    "DeepSeekLM",
    "LMOutput",
    "MTPModule",
    "ParamCount",
    "count_model_parameters",
    "count_parameters",
]
