"""Hugging Face DeepSeek-V2/V3 checkpoints: load into deepsuite, save back, convert (CLI)."""

from deepsuite.models.hf.cli import hf_main
from deepsuite.models.hf.config import config_to_hf, hf_flavor, hf_to_config
from deepsuite.models.hf.io import (
    HFCheckpointError,
    LoadReport,
    dequant_fp8,
    lazy_safetensors,
    load_hf_model,
    load_hf_weights,
    read_hf_config,
    save_hf_checkpoint,
    save_hf_state,
    weight_map,
)
from deepsuite.models.hf.names import Slot, hf_slots

__all__ = [
    "HFCheckpointError",
    "LoadReport",
    "Slot",
    "config_to_hf",
    "dequant_fp8",
    "hf_flavor",
    "hf_main",
    "hf_slots",
    "hf_to_config",
    "lazy_safetensors",
    "load_hf_model",
    "load_hf_weights",
    "read_hf_config",
    "save_hf_checkpoint",
    "save_hf_state",
    "weight_map",
]
