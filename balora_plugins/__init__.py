"""balora-plugins: BA-LoRA (arXiv:2408.04556) for TRL, transformers and axolotl trainers."""

from .config import PRESETS, BALoRAConfig

__version__ = "0.1.0"

__all__ = ["BALoRAConfig", "PRESETS", "__version__"]
