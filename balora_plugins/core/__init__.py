"""Framework-free BA-LoRA core: the term contract, the terms and their fused kernels, the reference, the
objective, the export, the model facts and the plugin hooks. Everything a program built on the library may use
is named here."""

from .contract import AUTOGRAD, CLOSED_FORM, MATRIX, ROW, RowKernel, Term, TopKRows, as_row_kernel
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
from .fused import HiddenView, LogitsView, OutputHead, chunked_row_terms
from .hookspecs import hookimpl
from .model import check_reference_head, decoder_of, output_head, validate_model
from .objective import BALoRAObjective, LossScaling
from .plugins import collect_terms, plugin_manager
from .precomputed import (
    DEFAULT_TOP_K,
    PrecomputedReference,
    ReferenceStore,
    example_key,
    precompute_reference,
    tokenizer_fingerprint,
)
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
from .terms import Consistency, EntropyDiversity, KLRows, NegEntropyRows, SVDShare

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AUTOGRAD",
    "AdapterStart",
    "BALoRAObjective",
    "CLOSED_FORM",
    "DEFAULT_TOP_K",
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
    "PrecomputedReference",
    "REF_ADAPTER",
    "ROW",
    "RowKernel",
    "ReferenceStore",
    "SVDShare",
    "Term",
    "TopKRows",
    "adapter_start",
    "as_row_kernel",
    "check_reference_head",
    "chunked_row_terms",
    "collect_terms",
    "decoder_of",
    "example_key",
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
    "precompute_reference",
    "prepare_reference",
    "reference_mode",
    "require_empty_dir",
    "save_initial_adapter",
    "tokenizer_fingerprint",
    "unwrap",
    "validate_model",
]
