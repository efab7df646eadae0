"""`BALoRAObjective`: the one object every trainer adapter calls.

It validates the model, installs the reference (:mod:`.reference`), captures the decoder backbone's final
hidden states (the stable place every TRL/transformers version computes), and on each micro-batch returns
the weighted regulariser loss — scaled exactly as the host trainer scales its cross-entropy (SPEC §3.3) —
together with per-term metrics.

Scaling (see :class:`LossScaling`): a row term (consistency; NLG entropy) is a sum over valid rows divided
by the host's ``num_items_in_batch`` (times the host's ×world-size factor) when the host normalises its
token loss that way, else a micro-batch mean that the host then divides by the accumulation steps. A matrix
term (SVD; NLU decorrelation) is a per-micro-batch statistic: the optimizer step sees its mean over the
micro-batches (and, under DDP, over ranks).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import BALoRAConfig
from ..functional import valid_position_mask
from . import reference as ref
from .fused import HiddenView, KLRows, LogitsView, NegEntropyRows, OutputHead, chunked_row_terms
from .plugins import collect_terms
from .terms import MATRIX, ROW, Consistency, EntropyDiversity, Term

QUANT_MODULES = ("Linear4bit", "Linear8bitLt", "QuantLinear", "HQQLinear", "AwqLinear", "QLinear")


# ---------------------------------------------------------------------------------------------- scaling
@dataclass
class LossScaling:
    """How the host trainer scales the loss a ``compute_loss`` returns.

    Attributes:
        num_items_in_batch: the token count the host divided its summed cross-entropy by (over all micro-batches
            of the optimizer step, and all ranks when tokens are averaged across devices), or None.
        world_factor: the factor the host multiplied its token-normalised loss by (DDP averages gradients).
        ga_steps: gradient-accumulation micro-batches in the current optimizer step.
        host_divides_by_ga: whether the host divides the returned loss by ``ga_steps`` afterwards.
    """

    num_items_in_batch: float | None = None
    world_factor: float = 1.0
    ga_steps: int = 1
    host_divides_by_ga: bool = True

    def row_weight(self, lam: float, local_rows: int, by_items: bool) -> float:
        """Weight turning a row-sum into the host's normalisation.

        λ·world/N when the host normalises its token loss by ``num_items_in_batch`` (NLG); otherwise a micro-batch
        mean λ/M that, like a matrix term, is averaged over the accumulation steps — by the host when it divides
        by them, else here (BERT-style classifiers accept ``**kwargs``, so the Trainer skips that division while
        their cross-entropy ignores the item count; the BA-LoRA terms stay split-invariant regardless).
        """
        if by_items and self.num_items_in_batch is not None:
            return lam * self.world_factor / max(float(self.num_items_in_batch), 1.0)
        return self.matrix_weight(lam) / max(local_rows, 1)

    def matrix_weight(self, lam: float) -> float:
        return lam if self.host_divides_by_ga else lam / max(self.ga_steps, 1)

    @classmethod
    def from_trainer(cls, trainer: Any, num_items_in_batch: Any) -> LossScaling:
        """Read the scaling rules off a transformers ``Trainer`` (or subclass: TRL, axolotl) for this step."""
        args = trainer.args
        ga = getattr(trainer, "current_gradient_accumulation_steps", None) or args.gradient_accumulation_steps
        scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (bool(getattr(trainer, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None) or (
                getattr(trainer, "compute_loss_func", None) is not None
            )
        n = None if num_items_in_batch is None else float(torch.as_tensor(num_items_in_batch).sum().item())
        world = 1.0
        if n is not None and getattr(args, "average_tokens_across_devices", False):
            # as Trainer/SFTTrainer.compute_loss: tensor-parallel ranks share a batch, DataParallel uses n_gpu
            tp = trainer.get_tp_size() if callable(getattr(trainer, "get_tp_size", None)) else 1
            world = float(trainer.accelerator.num_processes // max(int(tp), 1))
            if getattr(args, "n_gpu", 1) > 1:
                world = float(args.n_gpu)
        return cls(num_items_in_batch=n, world_factor=world, ga_steps=int(ga), host_divides_by_ga=not scaled)


# ---------------------------------------------------------------------------------------------- objective
class BALoRAObjective:
    """Shared BA-LoRA core: reference, hidden-state capture, the terms, scaling, metrics.

    Typical use by an adapter::

        obj = BALoRAObjective(config, ref_model=None).prepare(model)     # once, before step 1
        loss = host_loss + obj.compute(model, inputs, scaling=..., progress=step / max_steps)[0]
    """

    def __init__(
        self,
        config: BALoRAConfig | str | dict | None = None,
        *,
        ref_model: nn.Module | None = None,
        extra_plugins: Sequence[Any] = (),
        adapter_name: str = "default",
    ):
        self.config = BALoRAConfig.coerce(config)
        self.ref_model = ref_model
        self.adapter_name = adapter_name
        self.terms: list[Term] = collect_terms(self.config, extra_plugins)
        self.mode: str | None = None
        self.head: OutputHead | None = None
        self._backbone: nn.Module | None = None
        self._hook = None
        self._captured: dict[str, Any] | None = None
        self._in_reference = False
        self.skipped: dict[str, int] = {}
        self.num_classes: int | None = None

    # ------------------------------------------------------------------ setup
    def prepare(self, model: nn.Module) -> BALoRAObjective:
        """Validate ``model`` and install the reference and the capture hook. Idempotent."""
        peft_model = ref.unwrap(model)
        validate_model(peft_model, self.config, self.adapter_name)
        self.mode = ref.resolve_mode(self.config.reference, peft_model, self.ref_model, self.adapter_name)
        if self.mode == "adapter_snapshot" and ref.REF_ADAPTER not in peft_model.peft_config:
            ref.add_snapshot_adapter(peft_model, self.adapter_name)
        base = peft_model.get_base_model()
        if self.config.task == "nlg":
            self.head = output_head(base)
            backbone = decoder_of(base)
            if backbone is not self._backbone:
                self.remove_hooks()
                self._backbone = backbone
                self._hook = backbone.register_forward_hook(self._capture, with_kwargs=True)
        else:
            self.num_classes = int(base.config.num_labels)
            self.config.check_num_classes(self.num_classes)
        if self.ref_model is not None:
            self.ref_model.eval().requires_grad_(False)
            if self.config.task == "nlg":
                check_reference_head(self.head, self.ref_model)
        return self

    def remove_hooks(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._backbone = None
        self._captured = None

    def _capture(self, module, args, kwargs, output) -> None:
        if self._in_reference:
            return
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        # Did the student's forward end up with a KV cache? (use_cache comes from the config and is switched off
        # under gradient checkpointing inside the backbone.) The reference forward does the same, see below.
        used_cache = None
        if isinstance(output, Mapping):  # a ModelOutput lists only the fields that are set
            used_cache = output.get("cache") is not None or output.get("past_key_values") is not None
        self._captured = {"args": args, "kwargs": kwargs, "hidden": hidden, "used_cache": used_cache}

    # ------------------------------------------------------------------ reference forwards
    def _reference_hidden(self, model: nn.Module) -> torch.Tensor:
        cap = self._captured
        kwargs = dict(cap["kwargs"])
        # Same attention mask as the student's forward: transformers 5 builds a block-diagonal mask for packed
        # position_ids only without a KV cache, so the reference uses a cache exactly when the student did
        # (it runs in eval mode, where gradient checkpointing no longer turns the cache off). A cache object
        # the student's forward filled is dropped (the model starts a fresh one if it uses any).
        if cap.get("used_cache") is not None:
            kwargs["use_cache"] = cap["used_cache"]
        for key in ("past_key_values", "cache"):
            if kwargs.get(key) is not None:
                kwargs[key] = None
        self._in_reference = True
        try:
            if self.mode == "model":
                with torch.no_grad():
                    out = decoder_of(ref.unwrap(self.ref_model))(*cap["args"], **kwargs)
            else:
                inner = ref.unwrap(model)
                with ref.reference_mode(inner, self.mode), contextlib.ExitStack() as stack:
                    if self.mode == "adapter_snapshot":  # one matmul per projection when cheaper (no copy kept)
                        stack.enter_context(ref.merged_snapshot_forward(inner))
                    out = self._backbone(*cap["args"], **kwargs)
        finally:
            self._in_reference = False
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _reference_logits(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        fwd = {k: v for k, v in inputs.items() if k != "labels"}
        if self.mode == "model":
            with torch.no_grad():
                return self.ref_model(**fwd).logits
        inner = ref.unwrap(model)
        with ref.reference_mode(inner, self.mode):
            return inner(**fwd).logits

    # ------------------------------------------------------------------ the loss
    def compute(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        *,
        logits: torch.Tensor | None = None,
        scaling: LossScaling | None = None,
        progress: float = 0.0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted regulariser loss of the micro-batch the model just ran, and its metrics.

        Args:
            model: the (possibly wrapped) PEFT model that ran the forward.
            inputs: the micro-batch (``labels`` (B, T) for NLG; optional ``position_ids`` / ``shift_labels``).
            logits: NLU only: the classifier logits (B, C) of that forward.
            scaling: the host's loss scaling for this step (default: a plain micro-batch mean).
            progress: global_step / max_steps in [0, 1], for the λ schedules.

        Returns:
            ``(loss, metrics)``: a 0-d tensor to add to the host's loss and a dict of floats keyed
            ``balora/...``.
        """
        scaling = scaling or LossScaling()
        lambdas = self.config.lambdas_at(progress)
        weights = {t.name: t.weight(lambdas) for t in self.terms}
        metrics: dict[str, float] = {f"balora/lambda_{k}": v for k, v in weights.items()}
        if self.config.task == "nlg":
            rows, ref_rows, view, by_items = self._nlg_rows(model, inputs, weights, metrics)
        else:
            rows, ref_rows, view, by_items = self._nlu_rows(model, inputs, logits, weights)
        device = rows.device if rows is not None else torch.device("cpu")
        loss = torch.zeros((), device=device, dtype=torch.float32)
        if rows is None:
            return loss, metrics
        m = rows.shape[0]
        metrics["balora/rows"] = float(m)
        with torch.autocast(device_type=device.type, enabled=False):
            row_terms = [t for t in self.terms if t.level == ROW and weights[t.name] > 0]
            loss = loss + self._row_loss(row_terms, rows, ref_rows, weights, scaling, by_items, m, metrics)
            for t in self.terms:
                if t.level != MATRIX or weights[t.name] <= 0 or t.is_noop(*view.shape):
                    continue
                try:
                    value = t.matrix(view)
                except torch.linalg.LinAlgError:  # svdvals/eigh raise on non-finite input instead of NaN
                    value = torch.tensor(float("nan"))
                if not self._finite(t.name, value, metrics):
                    continue
                loss = loss + scaling.matrix_weight(weights[t.name]) * value
                self._record(metrics, t.name, float(value.detach()), weights[t.name])
        metrics["balora/loss"] = float(sum((v for k, v in metrics.items() if k.endswith("_weighted")), 0.0))
        return loss, metrics

    def _row_loss(self, terms, rows, ref_rows, weights, scaling, by_items, m, metrics) -> torch.Tensor:
        while terms:
            fns = [row_function(t) for t in terms]
            w = [scaling.row_weight(weights[t.name], m, by_items) for t in terms]
            if self.head is not None and self.config.task == "nlg":
                total, sums = chunked_row_terms(rows, ref_rows, self.head, fns, w, self.config.chunk_size)
            else:
                vals = [fn(rows.float(), None if ref_rows is None else ref_rows.float()).sum() for fn in fns]
                sums = torch.stack([v.detach() for v in vals])
                total = sum(wi * v for wi, v in zip(w, vals, strict=True))
            bad = [t for t, s in zip(terms, sums.tolist(), strict=True) if not math.isfinite(s)]
            if not bad:
                for t, s in zip(terms, sums.tolist(), strict=True):
                    self._record(metrics, t.name, s / m, weights[t.name])
                return total
            for t in bad:
                self._finite(t.name, torch.tensor(float("nan")), metrics)
            terms = [t for t in terms if t not in bad]  # recompute without the non-finite terms
        return rows.new_zeros((), dtype=torch.float32)

    def _nlg_rows(self, model, inputs, weights, metrics):
        if self._captured is None:
            raise RuntimeError(
                "BA-LoRA saw no decoder forward for this micro-batch: call objective.compute right after the "
                "model's forward, on the model passed to prepare()."
            )
        hidden = self._captured["hidden"]
        # read the head afresh: FSDP2 swaps the module's parameters after prepare()
        self.head = output_head(ref.unwrap(model).get_base_model())
        mask = self._valid_mask(inputs, hidden)
        need_ref = any(t.needs_reference and weights[t.name] > 0 for t in self.terms)
        if not bool(mask.any()):
            self._finite("no_valid_rows", torch.tensor(float("nan")), metrics)
            self._captured = None
            return None, None, None, True
        rows = hidden[mask]
        ref_rows = self._reference_hidden(model)[mask] if need_ref else None
        self._captured = None
        return rows, ref_rows, HiddenView(rows, self.head), True

    def _valid_mask(self, inputs, hidden) -> torch.Tensor:
        if inputs.get("shift_labels") is not None:
            mask = inputs["shift_labels"] != -100
        elif inputs.get("labels") is not None:
            mask = valid_position_mask(
                inputs["labels"], shift=self.config.shift_labels, position_ids=inputs.get("position_ids")
            )
        else:
            raise ValueError(
                "BA-LoRA (task='nlg') needs `labels` (B, T) in the batch to know which positions are trained; "
                "use a collator that sets labels (-100 on prompt/padding tokens)."
            )
        if mask.shape != hidden.shape[:2]:
            raise ValueError(f"label mask {tuple(mask.shape)} does not match hidden states {tuple(hidden.shape[:2])}")
        return mask.to(hidden.device)

    def _nlu_rows(self, model, inputs, logits, weights):
        if logits is None:
            raise ValueError("BA-LoRA (task='nlu') needs the classifier logits (B, C) of the forward: pass logits=.")
        need_ref = any(t.needs_reference and weights[t.name] > 0 for t in self.terms)
        ref_logits = self._reference_logits(model, inputs) if need_ref else None
        return logits, ref_logits, LogitsView(logits), False

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _record(metrics: dict[str, float], name: str, raw: float, lam: float) -> None:
        metrics[f"balora/{name}"] = raw
        metrics[f"balora/{name}_weighted"] = lam * raw

    def _finite(self, name: str, value: torch.Tensor, metrics: dict[str, float]) -> bool:
        if bool(torch.isfinite(value.detach()).all()):
            return True
        if self.config.on_nonfinite == "raise":
            raise FloatingPointError(f"BA-LoRA term {name!r} is not finite ({float(value)}); on_nonfinite='raise'.")
        self.skipped[name] = self.skipped.get(name, 0) + 1
        metrics[f"balora/skipped_{name}"] = float(self.skipped[name])
        warnings.warn(
            f"BA-LoRA term {name!r} is not finite on this micro-batch and is skipped "
            f"({self.skipped[name]} time(s) so far); training continues.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False


def row_function(term: Term):
    """The per-row function the chunked driver runs for ``term``: the built-in KL consistency and top-K entropy
    as closed-form kernels (same values, exact gradients without autograd, fewer (chunk, |V|) buffers), any
    other term — a subclass overriding ``rows`` included — as its own ``rows`` through autograd."""
    if type(term).rows is Consistency.rows and term.kind == "kl":
        return KLRows(term.temperature)
    if type(term).rows is EntropyDiversity.rows:
        return NegEntropyRows(term.top_k)
    return term.rows


# ---------------------------------------------------------------------------------------------- model facts
def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder backbone of a causal LM (the module whose output is the final hidden state)."""
    if hasattr(model, "get_decoder"):
        dec = model.get_decoder()
        if dec is not None and dec is not model:
            return dec
    prefix = getattr(model, "base_model_prefix", "model")
    for name in (prefix, "model", "transformer"):
        dec = getattr(model, name, None)
        if isinstance(dec, nn.Module) and dec is not model:
            return dec
    raise ValueError(f"cannot find the decoder backbone of {type(model).__name__}; BA-LoRA's NLG path needs one.")


def output_head(model: nn.Module) -> OutputHead:
    """The frozen output projection of a causal LM as an :class:`OutputHead`."""
    lin = model.get_output_embeddings()
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    scale = float(getattr(text_cfg, "logit_scale", None) or 1.0)
    if getattr(text_cfg, "logits_scaling", None):
        scale /= float(text_cfg.logits_scaling)
    softcap = getattr(text_cfg, "final_logit_softcapping", None)
    weight, bias, source = lin.weight, getattr(lin, "bias", None), None
    if hasattr(weight, "full_tensor"):  # FSDP2 / tensor-parallel DTensor: gather the frozen head for this step
        source, weight = weight, weight.full_tensor()  # the DTensor parameter keys the Gram-factor cache
        bias = bias.full_tensor() if hasattr(bias, "full_tensor") else bias
    return OutputHead(weight=weight, bias=bias, scale=scale, softcap=softcap, source=source)


def check_reference_head(head: OutputHead, ref_model: nn.Module) -> None:
    """The fused NLG path sends the reference's hidden states through the *trained model's* frozen head, so a
    separate reference model must have the same output head (up to dtype rounding)."""
    inner = ref.unwrap(ref_model)
    inner = inner.get_base_model() if ref.is_peft_model(inner) else inner
    lin = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    other = getattr(lin, "weight", None)
    if other is not None and (hasattr(other, "full_tensor") or hasattr(head.weight, "full_tensor")):
        return  # sharded (DTensor) heads: not gathered here
    mine = head.weight.detach()
    if other is not None and tuple(other.shape) == tuple(mine.shape):
        delta = (other.detach().to(mine.device).float() - mine.float()).norm()
        diff = delta / mine.float().norm().clamp(1e-12)
        if float(diff) <= 1e-2:
            return
        detail = f"relative difference {float(diff):.3g}"
    else:
        detail = f"shape {None if other is None else tuple(other.shape)} vs {tuple(mine.shape)}"
    raise ValueError(
        f"ref_model ({type(inner).__name__}) has a different output head than the trained model ({detail}). "
        "BA-LoRA's NLG path computes the reference logits from the reference's final hidden states through "
        "the trained model's frozen head, so the reference must be the pre-trained base model the adapter was "
        "created on (or omit ref_model to use the adapter snapshot)."
    )


def validate_model(peft_model: nn.Module, config: BALoRAConfig, adapter: str = "default") -> None:
    """Refuse, before step 1, models BA-LoRA cannot train correctly (errors name the problem and the fix)."""
    if not ref.is_peft_model(peft_model):
        raise ValueError(
            f"BA-LoRA needs a PEFT LoRA model, got {type(peft_model).__name__} without an adapter. Wrap it with "
            "peft.get_peft_model(model, LoraConfig(init_lora_weights='pissa', ...)) or pass peft_config= to the trainer."
        )
    cfg = peft_model.peft_config.get(adapter)
    if cfg is None or str(getattr(cfg, "peft_type", "")).split(".")[-1].upper() != "LORA":
        raise ValueError(
            f"BA-LoRA needs a LoRA adapter named {adapter!r}; found adapters "
            f"{ {k: str(getattr(v, 'peft_type', '?')) for k, v in peft_model.peft_config.items()} }."
        )
    base = peft_model.get_base_model()
    is_cls = type(base).__name__.endswith("ForSequenceClassification")
    if config.task == "nlu" and not is_cls:
        raise ValueError(
            f"BALoRAConfig.task='nlu' but the model is a {type(base).__name__}; NLU needs a sequence-classification "
            "model (AutoModelForSequenceClassification). For a causal LM use task='nlg' (e.g. preset 'iclr2026-nlg')."
        )
    if config.task == "nlg":
        if is_cls or base.get_output_embeddings() is None:
            raise ValueError(
                f"BALoRAConfig.task='nlg' but {type(base).__name__} has no language-model head; use task='nlu' "
                "(preset 'iclr2026-nlu') for classifiers."
            )
        head = base.get_output_embeddings()
        if hasattr(head, "base_layer") or hasattr(head, "modules_to_save") or head.weight.requires_grad:
            raise ValueError(
                "BA-LoRA computes its terms from the frozen output head, but the head is trained (LoRA on it, "
                "modules_to_save, or trainable lm_head weights). Remove 'lm_head' from target_modules / "
                "modules_to_save and keep the head frozen."
            )
    if ref.has_residual_base(peft_model, adapter):
        quant = [type(m).__name__ for m in base.modules() if type(m).__name__ in QUANT_MODULES]
        qcfg = getattr(base.config, "quantization_config", None)
        method = (qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)) or ""
        if quant or (qcfg is not None and str(method).split(".")[-1].lower() not in ("gguf", "")):
            raise ValueError(
                f"init_lora_weights={ref.lora_init(peft_model, adapter)!r} on a quantised base "
                f"({quant[0] if quant else method}): PiSSA's residual cannot be stored exactly in quantised weights, "
                "so the reference is not the pre-trained model. Load the base unquantised, or use plain LoRA init "
                "(init_lora_weights=True)."
            )
