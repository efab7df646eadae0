"""Framework-free BA-LoRA core: the term contract, the terms and their fused kernels, the reference, the
objective, the export, the model facts and the plugin hooks. Everything a program built on the library may use
is named here."""

from .card import CARD_NAME, PAPER, TAGS, nearest_preset, update_model_card
from .contract import AUTOGRAD, CLOSED_FORM, MATRIX, ROW, RowKernel, Term, TopKRows, as_row_kernel
from .distributed import adapter_is_sharded, full_adapter_state, is_partitioned
from .export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    APPROXIMATE_REASON,
    HELD_RESUME_DIR,
    INITIAL_DIR,
    RESUME_DIR,
    export_merged,
    export_plain_lora,
    find_initial_adapter,
    load_initial_adapter,
    name_base_model,
    require_empty_dir,
    resume_adapter_dir,
    save_initial_adapter,
    write_servable_layout,
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
from .quantized import (
    get_qpissa_model,
    qpissa_initialize,
    quantization_note,
    quantized_layer_types,
    wants_qpissa,
    weight_source,
)
from .reference import (
    REF_ADAPTER,
    AdapterStart,
    adapter_start,
    adapter_state,
    has_residual_base,
    init_is_approximate,
    init_rewrites_base,
    is_peft_model,
    lora_init,
    prepare_reference,
    reference_mode,
    resolve_mode,
    restore_residual_base,
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
# what the doors (trainer mixin, engines, TRL, callback, axolotl) use besides the names above: they import
# the core only from here (tests/test_layout.py)
__all__ += [
    "CARD_NAME",
    "PAPER",
    "TAGS",
    "nearest_preset",
    "update_model_card",
    "adapter_is_sharded",
    "full_adapter_state",
    "is_partitioned",
    "APPROXIMATE_REASON",
    "HELD_RESUME_DIR",
    "RESUME_DIR",
    "name_base_model",
    "resume_adapter_dir",
    "write_servable_layout",
    "qpissa_initialize",
    "quantization_note",
    "quantized_layer_types",
    "wants_qpissa",
    "weight_source",
    "adapter_state",
    "init_is_approximate",
    "lora_init",
    "resolve_mode",
    "restore_residual_base",
]
