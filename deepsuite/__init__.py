"""deepsuite: DeepSeek-V3-style Mixture-of-Experts layers and an expert-parallel training system."""

__version__ = "0.1.0"
