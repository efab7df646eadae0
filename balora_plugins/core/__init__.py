"""Framework-free BA-LoRA core: fused terms, reference, objective, export, plugin hooks."""

from .export import export_plain_lora, load_initial_adapter, save_initial_adapter
from .fused import HiddenView, LogitsView, OutputHead, chunked_row_terms
from .hookspecs import hookimpl
from .objective import BALoRAObjective, LossScaling
from .plugins import plugin_manager
from .reference import REF_ADAPTER, reference_mode
from .terms import Term

__all__ = [
    "BALoRAObjective",
    "LossScaling",
    "OutputHead",
    "HiddenView",
    "LogitsView",
    "chunked_row_terms",
    "Term",
    "hookimpl",
    "plugin_manager",
    "reference_mode",
    "REF_ADAPTER",
    "export_plain_lora",
    "save_initial_adapter",
    "load_initial_adapter",
]
