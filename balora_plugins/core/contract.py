"""The term contract: what a BA-LoRA regularizer term is, and the row-kernel protocol the chunked driver runs.

Nothing here knows a particular term; the built-in terms (:mod:`balora_plugins.core.terms`) and a third
party's implement this contract alike, and :mod:`balora_plugins.core.hookspecs` names only it. How to write a
term plugin: docs/extending.md.

* :class:`Term` — a regularizer: its ``name``, ``level`` (:data:`ROW` or :data:`MATRIX`), whether it needs the
  reference, its weight from the scheduled λs, and its formula (:meth:`Term.rows` or :meth:`Term.matrix`).
* :class:`RowKernel` — what a row term hands the chunked driver (:meth:`Term.row_kernel`): the row function,
  and a declared :attr:`RowKernel.gradient` — :data:`AUTOGRAD` (default: the driver differentiates the call)
  or :data:`CLOSED_FORM` (the kernel's :meth:`RowKernel.rows_and_grad` adds its own exact gradient, and the
  driver skips autograd inside the chunk). A plain function ``(z, z_ref) -> (n,)`` is an autograd kernel.
* :class:`TopKRows` — the reference rows a precomputed reference hands a kernel instead of full logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

ROW = "row"
MATRIX = "matrix"
AUTOGRAD = "autograd"
CLOSED_FORM = "closed_form"


# ---------------------------------------------------------------------------------------------- reference rows
@dataclass
class TopKRows:
    """A reference given per row as its top-k logits and one bucket for the rest of the vocabulary, at one T.

    What a precomputed reference (docs/precomputed_reference.md) hands the chunked driver instead of reference
    hidden states: with it, q_v = exp(z_v/T − ``log_normalizer``) is exact for the k stored tokens and the
    rest of the vocabulary is one bucket of mass exp(``tail_log_mass``). Sliced by rows like a tensor. Only
    kernels that declare :attr:`RowKernel.accepts_topk_reference` are given one.

    Attributes:
        token_ids: (M, k) int64, the k largest reference logits' token ids.
        logits: (M, k) fp32, those logits z (raw, not divided by T).
        log_normalizer: (M,) fp32, logsumexp(z/T) over the full vocabulary.
        tail_log_mass: (M,) fp32, log of the tempered reference mass outside the top k (−inf when k = |V|).
        entropy: (M,) fp32, H(softmax(z/T)) over the full vocabulary (the adaptive λ1's confidence).
        temperature: T.
    """

    token_ids: torch.Tensor
    logits: torch.Tensor
    log_normalizer: torch.Tensor
    tail_log_mass: torch.Tensor
    entropy: torch.Tensor
    temperature: float

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def __getitem__(self, rows: slice) -> TopKRows:
        return TopKRows(
            self.token_ids[rows],
            self.logits[rows],
            self.log_normalizer[rows],
            self.tail_log_mass[rows],
            self.entropy[rows],
            self.temperature,
        )

    def to(self, device: torch.device | str) -> TopKRows:
        return TopKRows(
            self.token_ids.to(device, non_blocking=True),
            self.logits.to(device, non_blocking=True),
            self.log_normalizer.to(device, non_blocking=True),
            self.tail_log_mass.to(device, non_blocking=True),
            self.entropy.to(device, non_blocking=True),
            self.temperature,
        )


Reference = torch.Tensor | TopKRows | None
RowFn = Callable[[torch.Tensor, Reference], torch.Tensor]


# ---------------------------------------------------------------------------------------------- row kernels
class RowKernel:
    """The row-kernel protocol: one chunk of logits in, one value per row out (and, optionally, its gradient).

    The chunked driver (:func:`~balora_plugins.core.fused.chunked_row_terms`) calls a kernel on fp32 chunks of
    the student's logits ``z`` (n, V) and the reference's ``z_ref`` — (n, V) fp32 logits, a :class:`TopKRows`
    (only when :attr:`accepts_topk_reference`), or None for a term without a reference.

    * ``kernel(z, z_ref) -> (n,)``: the per-row values. Always required.
    * :attr:`gradient` declares how the driver gets ∂/∂z: :data:`AUTOGRAD` (the default) — autograd of the call
      with respect to the chunk's logits only; :data:`CLOSED_FORM` — the kernel's :meth:`rows_and_grad` adds
      its exact gradient into a chunk-wide buffer and the driver builds no graph (fewer full-width buffers per
      chunk). The closed form is used when every kernel of one driver call declares it.
    * :attr:`accepts_topk_reference`: the kernel takes a :class:`TopKRows` reference (reference="precomputed").

    Subclass it and set the class attributes; a class that declares :data:`CLOSED_FORM` without defining
    :meth:`rows_and_grad` is refused when it is defined.
    """

    gradient: ClassVar[str] = AUTOGRAD
    accepts_topk_reference: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.gradient not in (AUTOGRAD, CLOSED_FORM):
            raise TypeError(
                f"row kernel {cls.__name__} declares gradient={cls.gradient!r}; "
                f"use {AUTOGRAD!r} (autograd of the call) or {CLOSED_FORM!r} (with rows_and_grad)."
            )
        if cls.gradient == CLOSED_FORM and cls.rows_and_grad is RowKernel.rows_and_grad:
            raise TypeError(
                f"row kernel {cls.__name__} declares gradient={CLOSED_FORM!r} but does not define "
                "rows_and_grad(z, z_ref, weight, acc, need_grad); define it, or declare gradient='autograd'."
            )

    def __call__(self, z: torch.Tensor, z_ref: Reference) -> torch.Tensor:
        """Per-row values (n,) of fp32 logits ``z`` (n, V) against the reference ``z_ref``."""
        raise NotImplementedError(f"row kernel {type(self).__name__} does not define __call__(z, z_ref)")

    def rows_and_grad(
        self, z: torch.Tensor, z_ref: Reference, weight: float, acc: torch.Tensor | None, need_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The closed form (only with ``gradient = "closed_form"``): per-row values (n,), and — when
        ``need_grad`` — ``acc`` (n, V) fp32 += ``weight``·∂Σvalues/∂z, allocated when None (it may reuse a
        buffer the kernel computed; ``z`` must stay unchanged). Without ``need_grad`` ``acc`` is returned as
        given. Called under ``torch.no_grad()``."""
        raise NotImplementedError(
            f"row kernel {type(self).__name__} declares gradient={self.gradient!r}: the driver differentiates "
            "its call with autograd, it has no rows_and_grad"
        )


class AutogradRows(RowKernel):
    """A plain row function ``fn(z, z_ref) -> (n,)`` as a :class:`RowKernel` differentiated by autograd."""

    def __init__(self, fn: RowFn):
        self.fn = fn

    def __call__(self, z: torch.Tensor, z_ref: Reference) -> torch.Tensor:
        return self.fn(z, z_ref)

    def __repr__(self) -> str:
        return f"AutogradRows({self.fn!r})"


def as_row_kernel(fn: RowKernel | RowFn) -> RowKernel:
    """``fn`` itself when it is a :class:`RowKernel`, else the plain function as an autograd kernel."""
    return fn if isinstance(fn, RowKernel) else AutogradRows(fn)


# ---------------------------------------------------------------------------------------------- terms
def _same(a: Any, b: Any) -> bool:
    """Setting equality that also holds for tensors (same dtype, shape, device and values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device)
            and bool(torch.equal(a, b))
        )
    return bool(a == b)


@dataclass(eq=False, repr=False)
class Term:
    """Base class of a regularizer term.

    Subclasses set ``name`` (unique; the metric ``balora/<name>`` and the λ key), ``level`` (:data:`ROW` or
    :data:`MATRIX`), ``needs_reference`` and implement :meth:`rows` (row terms) or :meth:`matrix` (matrix
    terms). :meth:`weight` maps the scheduled λs to this term's weight; a third-party term may ignore them and
    return its own constant. A row term may hand the driver a faster kernel for its formula
    (:meth:`row_kernel`).

    Two terms are equal when they are of the same class and every setting (each instance attribute) is equal:
    ``Consistency`` at T = 1 and at T = 2 are two different terms.
    """

    name: str = "term"
    level: str = ROW
    needs_reference: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass that restates the formula runs it as written (through autograd), never its parent's kernel
        # of the parent's formula; to keep a fused kernel it states one for its own formula too.
        if "rows" in vars(cls) and "row_kernel" not in vars(cls):
            cls.row_kernel = Term.row_kernel

    def weight(self, lambdas: dict[str, float]) -> float:
        return float(lambdas.get(self.name, 0.0))

    def rows(self, logits: torch.Tensor, ref_logits: Reference) -> torch.Tensor:  # pragma: no cover
        """Row terms: (M, C) fp32 logits and (M, C) reference logits (or None) -> (M,) per-row values."""
        raise TypeError(f"term {self.name!r} is a row term but does not define rows()")

    def row_kernel(self) -> RowKernel | RowFn:
        """What the chunked driver runs on each (rows, |V|) fp32 chunk of logits (the fused-kernel hook).

        By default this term's own :meth:`rows`, which the driver differentiates with autograd. A term offers a
        fused kernel by overriding this method to return a :class:`RowKernel` that declares
        ``gradient = "closed_form"``; the driver asks the kernel, it never looks at the term's type.
        """
        return self.rows

    def matrix(self, view: Any) -> torch.Tensor:  # pragma: no cover
        """Matrix terms: a :class:`~balora_plugins.core.fused.LogitsView` of the (M, C) logits -> 0-d tensor."""
        raise TypeError(f"term {self.name!r} is a matrix term but does not define matrix()")

    def is_noop(self, num_rows: int, num_cols: int) -> bool:
        """True when the term is constant for logits of this shape (so it is skipped)."""
        return False

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        mine, theirs = vars(self), vars(other)
        return mine.keys() == theirs.keys() and all(_same(v, theirs[k]) for k, v in mine.items())

    __hash__ = None  # mutable settings, compared by value

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({settings})"
