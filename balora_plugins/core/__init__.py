"""Framework-free BA-LoRA core: the terms and their fused kernels, the reference, the objective, the export,
the model facts and the plugin hooks. Everything a program built on the library may use is named here."""

from .export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    INITIAL_DIR,
    export_merged,
    export_plain_lora,
    find_initial_adapter,
    load_initial_adapter,
    require_empty_dir,
    save_initial_adapter,
)
from .fused import HiddenView, LogitsView, OutputHead, chunked_row_terms, clear_factor_cache
from .hookspecs import hookimpl
from .model import check_reference_head, decoder_of, output_head, validate_model
from .objective import BALoRAObjective, LossScaling
from .plugins import collect_terms, plugin_manager
from .quantized import get_qpissa_model
from .reference import (
    REF_ADAPTER,
    AdapterStart,
    adapter_start,
    has_residual_base,
    init_rewrites_base,
    is_peft_model,
    prepare_reference,
    reference_mode,
    unwrap,
)
from .terms import MATRIX, ROW, Consistency, EntropyDiversity, KLRows, NegEntropyRows, SVDShare, Term

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterStart",
    "BALoRAObjective",
    "Consistency",
    "EntropyDiversity",
    "HiddenView",
    "INITIAL_DIR",
    "KLRows",
    "LogitsView",
    "LossScaling",
    "MATRIX",
    "NegEntropyRows",
    "OutputHead",
    "REF_ADAPTER",
    "ROW",
    "SVDShare",
    "Term",
    "adapter_start",
    "check_reference_head",
    "chunked_row_terms",
    "clear_factor_cache",
    "collect_terms",
    "decoder_of",
    "export_merged",
    "export_plain_lora",
    "find_initial_adapter",
    "get_qpissa_model",
    "has_residual_base",
    "hookimpl",
    "init_rewrites_base",
    "is_peft_model",
    "load_initial_adapter",
    "output_head",
    "plugin_manager",
    "prepare_reference",
    "reference_mode",
    "require_empty_dir",
    "save_initial_adapter",
    "unwrap",
    "validate_model",
]
