"""An exact cache of the NLU reference logits, keyed by example (``BALoRAConfig.reference_cache``).

For sequence classification the reference — the frozen pre-trained model in eval mode, no dropout — maps one
example to one row of D logits, and that row never changes during training. From the second epoch on, the
reference forward of a micro-batch can be skipped: the rows come from this cache, and only examples not seen
before (a new example, or a different tokenisation of it) run the reference forward, as a sub-batch of their
own rows.

**Key.** An example is identified by its content, not by its position in a dataset (the host's data loader does
not pass indices): every per-row input tensor of the forward (``input_ids``, ``token_type_ids``, ...) at the
row's attended positions (``attention_mask`` = 1), together with those positions' indices, hashed with
BLAKE2b-128. Right padding to a different batch length therefore hits the cache; a different left padding (the
tokens sit at other positions) is a miss and runs the reference — never a wrong hit.

**Exactness.** A hit returns the values the reference forward computed for that example, bit for bit; whether
the example was then padded to another length changes only the rounding of a recomputation, not the maths.
The cache is dropped when the reference's parameters change: in place (their version counters), by a new storage
(``p.data = ...``) or by new parameter objects (``load_state_dict(..., assign=True)``) — :func:`reference_state`.

**Cost.** Per distinct example, D logits in fp32 (4·D bytes; bf16/fp16 logits are widened, exactly; the buffer
grows by doubling) plus about 150 bytes of key and index (measured: 134), in CPU memory; 100 000 examples of a
5-class task take about 17 MB. Nothing goes to disk; a resumed run refills the cache during its first epoch.

**Why not NLG.** A causal LM's reference output per example is a (T, |V|) matrix (the consistency KL needs the
full distribution at every position): exact caching would mean T·d hidden values per example (2·T·d bytes in
bf16: 4 MB for T = 512, d = 4096 — 400 GB for 100 000 examples) plus the head product each step, or T·|V|
logits (orders of magnitude more). Keeping only the top-K logits makes the KL approximate: that is the opt-in
``reference='precomputed'`` (:mod:`.precomputed`, docs/precomputed_reference.md). See docs/method.md §2.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

KEY_BYTES = 16


class ReferenceCache:
    """Reference logits per example: ``rows`` (N, D) in one growing CPU buffer, an index from key to row."""

    def __init__(self) -> None:
        self._index: dict[bytes, int] = {}
        self._rows: torch.Tensor | None = None
        self._state: Any = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._index)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored logits (the index adds about 150 bytes per example)."""
        return 0 if self._rows is None else len(self._index) * self._rows.shape[1] * self._rows.element_size()

    def clear(self) -> None:
        self._index.clear()
        self._rows = None

    # ------------------------------------------------------------------ the one entry point
    def logits(
        self,
        inputs: Mapping[str, Any],
        compute: Callable[[dict[str, Any]], torch.Tensor],
        state: Any = None,
    ) -> torch.Tensor:
        """The reference logits (B, D) of the micro-batch ``inputs`` (its forward keyword arguments).

        ``compute(sub_inputs)`` runs the reference forward on a sub-batch (the rows not cached yet) and returns
        its (b, D) logits. ``state`` identifies the reference (e.g. its parameters' versions): when it differs
        from the state the cached rows were computed under, the cache is emptied first.
        """
        if state != self._state:
            self.clear()
            self._state = state
        keys = example_keys(inputs)
        missing = [i for i, k in enumerate(keys) if k not in self._index]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if len(missing) == len(keys):
            fresh = compute(dict(inputs))
            self._store(keys, fresh)
            return fresh
        device = _device_of(inputs)
        if missing:
            sub = select_rows(inputs, missing)
            fresh = compute(sub)
            self._store([keys[i] for i in missing], fresh)
        out = self._rows[[self._index[k] for k in keys]]
        return out.to(device)

    def _store(self, keys: list[bytes], logits: torch.Tensor) -> None:
        new = {}
        for i, k in enumerate(keys):  # an example twice in one batch: stored once
            new.setdefault(k, i)
        if not new:
            return
        values = logits.detach()[list(new.values())].to("cpu")
        n = len(self._index)
        if self._rows is None:
            # fp32 (or wider): bf16/fp16 logits are stored exactly, and a later step in another dtype loses nothing
            dtype = torch.promote_types(values.dtype, torch.float32)
            self._rows = values.new_empty((max(64, 2 * len(new)), values.shape[1]), dtype=dtype)
        elif n + len(new) > self._rows.shape[0]:  # grow by doubling: amortised O(1) per example
            grown = self._rows.new_empty((2 * (n + len(new)), self._rows.shape[1]))
            grown[:n] = self._rows[:n]
            self._rows = grown
        self._rows[n : n + len(new)] = values.to(self._rows.dtype)
        for j, k in enumerate(new):
            self._index[k] = n + j


def reference_state(reference: torch.nn.Module) -> bytes:
    """A 16-byte digest of what identifies the frozen parameters of ``reference`` — the module whose forward gives
    the reference (the PEFT model in reference mode, or a separate reference model): base weights, the snapshot
    adapter, the original classifier. Per parameter: the object, its storage address and its version counter, so
    an in-place change (``copy_``, a checkpoint's initial adapter loaded on resume), a new storage (``p.data =
    ...``) and a new parameter (``load_state_dict(..., assign=True)``) all change it. The trained parameters are
    not part of the reference and are left out. Constant memory, one pass over the parameters per step."""
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for p in reference.parameters():
        if p.requires_grad:
            continue
        try:
            address = p.data_ptr()
        except (RuntimeError, NotImplementedError):  # a tensor subclass without one storage (DTensor)
            address = -1
        h.update(struct.pack("<qqq", id(p), address, int(p._version)))
    return h.digest()


def _device_of(inputs: Mapping[str, Any]) -> torch.device:
    for v in inputs.values():
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


def _batch_size(inputs: Mapping[str, Any]) -> int:
    for name in ("input_ids", "inputs_embeds", "attention_mask"):
        v = inputs.get(name)
        if isinstance(v, torch.Tensor):
            return int(v.shape[0])
    raise ValueError(
        "BALoRAConfig.reference_cache needs `input_ids` (or `inputs_embeds`) in the batch to tell examples apart; "
        "set reference_cache=False for this model."
    )


def example_keys(inputs: Mapping[str, Any]) -> list[bytes]:
    """One BLAKE2b-128 key per row of the micro-batch ``inputs`` (see the module docstring)."""
    b = _batch_size(inputs)
    mask = inputs.get("attention_mask")
    mask = mask.detach().to("cpu").bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    shared = hashlib.blake2b(digest_size=KEY_BYTES)  # inputs that are not per row enter every key
    rows: list[tuple[str, torch.Tensor]] = []
    for name in sorted(inputs):
        v = inputs[name]
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b:
            rows.append((name, v.detach().to("cpu")))
        elif name != "labels":
            shared.update(f"{name}={_plain(v)!r};".encode())
    keys = []
    for i in range(b):
        h = shared.copy()
        keep = mask[i] if mask is not None else None
        if keep is not None:
            h.update(b"pos" + keep.nonzero().flatten().numpy().tobytes())
        for name, v in rows:
            if name == "attention_mask":
                continue  # its content is the positions above
            row = v[i]
            if keep is not None and row.shape[:1] == keep.shape:
                row = row[keep]
            h.update(f"{name}:{row.dtype}:{tuple(row.shape)}:".encode())
            h.update(row.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        keys.append(h.digest())
    return keys


def select_rows(inputs: Mapping[str, Any], index: Iterable[int]) -> dict[str, Any]:
    """The sub-batch of ``inputs`` with rows ``index`` (every per-row tensor indexed, the rest passed as is)."""
    b = _batch_size(inputs)
    index = list(index)
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b:
            out[k] = v[torch.as_tensor(index, device=v.device)]
        else:
            out[k] = v
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return (str(v.dtype), tuple(v.shape), v.detach().to("cpu").flatten().tolist()[:64])
    return v
