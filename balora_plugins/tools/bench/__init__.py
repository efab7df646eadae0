"""`balora bench`: step time and peak memory of BA-LoRA against PiSSA-LoRA and the authors' approach.

One run, one model, one micro-batch (``python -m balora_plugins.tools.bench --help``):

* **a** — PiSSA-LoRA, no regularizer (the baseline): ``model(**batch).loss``, backward, AdamW step.
* **b** — BA-LoRA as this package runs it: :class:`~balora_plugins.core.objective.BALoRAObjective` with the
  ``iclr2026-nlg`` preset (constant schedules), the fused hidden-state path and the snapshot-adapter reference.
* **c** — the authors' approach (``llm172/BA-LoRA`` ``train.py``) re-expressed: a second full copy of the
  pre-trained model as the reference, the three terms on the full-vocabulary logits (tempered KL on every
  position then masked, top-K entropy, ``torch.svd_lowrank`` with q = k + 5 and 2 power iterations when
  |V| > 4096), and their unshifted ``labels != -100`` mask.
* **a** and **b** again in a second dtype (``--also-dtype``; bf16 by default on an fp32 run): peak memory of
  the first step and one timed step.
* **NLU**: a random classifier of all-MiniLM-L6-v2's shape with the ``iclr2026-nlu`` preset — (a), (b) with a
  reference forward every step, and (b) with ``reference_cache=True`` timed from the batch's second epoch.
* **4-bit base** (``--no-qlora`` skips it; needs bitsandbytes): (a), (b) and (c) again on the same model loaded
  in 4 bits (bitsandbytes nf4) with QPiSSA — PiSSA of the full-precision weights, the residual re-quantised
  (docs/qlora.md); (c)'s second model is the full-precision pre-trained one, as the authors load it.

Each variant runs in a fresh subprocess (``--in-process`` to run them here), builds the same random model of
the chosen shape (or loads ``--model``) with the same seed — the PiSSA initialisation is computed once and
shared — and measures after ``--warmup`` steps the median of ``--steps`` training steps: wall-clock time
(synchronised on CUDA) and the process's CPU time (all its threads), which other processes sharing the cores
barely disturb. Peak memory is the peak of the memory allocated *after* the PiSSA model is built — so it
contains each variant's own set-up (snapshot adapter, second model copy), the optimizer state and the step —
measured as the peak of live tensor bytes (CUDA: the caching allocator's statistics; CPU: the allocation
trace of ``torch.profiler`` over the set-up and the first step) and, on CPU in a subprocess, also as the
growth of the process's peak RSS over set-up and steps (Linux ``clear_refs``/``VmHWM``), which adds allocator
and library overheads.

It also times each term of (b) on the same micro-batch (forward and gradient with respect to the hidden
states; consistency includes the reference forward), and the regularizers alone on an (M, d) hidden-state
matrix against the plain-logits path (target: extra peak memory < 1/8 of the plain path's), with the SVD term
of a soft-capped head (``--softcap``).

Modules: :mod:`.args` (command line), :mod:`.build` (models, batches, adapters), :mod:`.measure` (clocks and
memory), :mod:`.variants`, :mod:`.regularizers`, :mod:`.table` (document, targets, table), :mod:`.run`
(orchestration, :func:`main`).
"""

from .args import NLU_VARIANTS, Q4_VARIANTS, SHAPES, VARIANTS, build_parser
from .measure import MemoryMeter, peak_from_trace
from .regularizers import run_regularizers
from .run import main
from .table import TARGETS, check_targets, format_table, ratio, summarise
from .variants import authors_regularizer, run_nlu_variant, run_variant

__all__ = [
    "NLU_VARIANTS",
    "Q4_VARIANTS",
    "SHAPES",
    "TARGETS",
    "VARIANTS",
    "MemoryMeter",
    "authors_regularizer",
    "build_parser",
    "check_targets",
    "format_table",
    "main",
    "peak_from_trace",
    "ratio",
    "run_nlu_variant",
    "run_regularizers",
    "run_variant",
    "summarise",
]
