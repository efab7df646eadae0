"""A precomputed top-k reference for causal LMs (``BALoRAConfig.reference='precomputed'``).

The consistency term needs, at every trained position, the pre-trained model's tempered distribution q over the
vocabulary. :func:`precompute_reference` runs the pre-trained model once over the training data (inference only)
and stores, per valid position, the k largest reference logits with their token ids, and per stored temperature
T the full log-normaliser logsumexp(z/T), the log of the mass outside the top k and the entropy — so the top-k
probabilities are exact and the rest of the vocabulary is one bucket (the KL kernel:
:meth:`~balora_plugins.core.terms.KLRows.topk_rows_and_grad`). Training then reads its rows
(:class:`PrecomputedReference`) instead of running a reference forward, and keeps no snapshot adapter in memory.

**Format** (docs/precomputed_reference.md): a folder with ``manifest.json`` and ``shard-NNNNN.safetensors``
files, each holding a block of examples in dataset order: ``keys`` (E, 16) uint8, ``lengths`` (E,) int64,
``row_offsets`` (E + 1,) int64, ``positions`` (R,) int32, ``token_ids`` (R, k) int32, ``logits`` (R, k) fp32,
``log_normalizer`` / ``tail_log_mass`` / ``entropy`` (R, len(temperatures)) fp32. Shards are written whole
(temporary file, then rename) and the manifest after each one, so an interrupted run resumes at the next shard.

**Keys.** An example is found by the BLAKE2b-128 hash of its token ids (int64), wherever shuffling puts it; a
packed row is split into its documents at ``position_ids`` = 0 (or by ``seq_lengths``), padding is skipped by
``attention_mask``. The reference at position t depends only on tokens ≤ t, so nothing else is needed. A key
that is not in the store (another dataset, tokenizer, chat template or max length) is refused by name — before
step 1 when the trainer's dataset can be read (:meth:`PrecomputedReference.check_dataset`), else at the step.

**Model.** The manifest records a fingerprint of the model (architecture settings, revision) and its logits on a
probe sequence; :meth:`PrecomputedReference.check_model` compares them with the model being trained at step 0,
which is the reference for every init BA-LoRA accepts (plain LoRA: B₀ = 0; PiSSA: W_res + s·B₀A₀ = W). A store
computed from another model, another revision, or a PiSSA residual base instead of the untouched base is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..functional import IGNORE_INDEX
from .contract import TopKRows, as_row_kernel
from .model import decoder_of, output_head, probe_possible

FORMAT = "balora-topk-reference"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD = "shard-{:05d}.safetensors"
KEY_BYTES = 16
DEFAULT_TOP_K = 128
"""k stored per position by default (chosen from the fidelity numbers in docs/precomputed_reference.md)."""
DEFAULT_TEMPERATURES = (1.0, 2.0)
"""The presets' temperatures: ``iclr2026-nlg`` T = 2, ``v5-nlg`` T = 1 (no tempering)."""
POSITIONS = ("labels", "all")
PROBE_TOKENS = 32
PROBE_TOP = 8
# Relative difference ‖z − z_stored‖/‖z_stored‖ of the probe's top logits above which the model being trained is not
# the one the store was computed from. bf16 against fp32 differs by about 1e-2 on SmolLM2-135M; another model,
# or the PiSSA residual base instead of the untouched one, by 0.1 - 1.
PROBE_TOL = 0.05
ARCHITECTURE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "rope_theta",
    "rms_norm_eps",
    "layer_norm_eps",
    "tie_word_embeddings",
    "final_logit_softcapping",
    "logit_scale",
)
TENSORS = ("token_ids", "logits", "positions")
PER_T = ("log_normalizer", "tail_log_mass", "entropy")


# ---------------------------------------------------------------------------------------------- keys and fingerprints
def example_key(token_ids: Sequence[int] | torch.Tensor | np.ndarray) -> bytes:
    """BLAKE2b-128 of one example's token ids as int64 (the key the store and the trainer share)."""
    if isinstance(token_ids, torch.Tensor):
        arr = token_ids.detach().to("cpu", torch.int64).contiguous().numpy()
    else:
        arr = np.ascontiguousarray(np.asarray(token_ids, dtype=np.int64))
    return hashlib.blake2b(arr.tobytes(), digest_size=KEY_BYTES).digest()


def dataset_fingerprint(keys: Iterable[bytes]) -> str:
    """SHA-256 of the sorted distinct example keys: the same for any order of the same examples."""
    h = hashlib.sha256()
    for k in sorted(set(keys)):
        h.update(k)
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies the reference model: its class, name, revision and the settings that define its function."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    arch = {k: getattr(text, k) for k in ARCHITECTURE_KEYS if getattr(text, k, None) is not None}
    return {
        "class": type(model).__name__,
        "name_or_path": str(getattr(cfg, "_name_or_path", "") or getattr(model, "name_or_path", "") or ""),
        "revision": getattr(cfg, "_commit_hash", None),
        "architecture": json.loads(json.dumps(arch, default=str)),
    }


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any] | None:
    """Name and SHA-256 (first 16 hex digits) of a tokenizer's vocabulary, special tokens and chat template."""
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return None
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    return {"name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""), "sha256": h.hexdigest()[:16]}


def _probe_logits(model: nn.Module, input_ids: list[int]) -> torch.Tensor:
    """The model's fp32 logits (n, |V|) on ``input_ids`` (eval mode, no grad; every module's mode restored)."""
    training = [(m, m.training) for m in model.modules()]
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            out = model(input_ids=torch.tensor([input_ids], device=device), use_cache=False)
    finally:
        for m, flag in training:
            m.training = flag
    return out.logits[0].float()


# ---------------------------------------------------------------------------------------------- valid positions
def example_positions(
    example: Mapping[str, Any], positions: str = "labels", shift_labels: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids (L,) int64, the positions (n,) int64 whose reference is stored) of one tokenised example.

    ``positions="labels"``: the positions a trainer regularises — t is kept when the label of t + 1 (``labels``,
    else TRL's ``completion_mask`` / ``assistant_masks``) is not -100 (``shift_labels=False``: the label of t);
    without any of them, every position. ``"all"``: every position but the last (a store that serves any
    completion-only setting, at the cost of the prompt tokens' rows).
    """
    ids = np.asarray(example["input_ids"], dtype=np.int64).reshape(-1)
    n = ids.shape[0]
    labels = None
    if positions == "labels":
        if example.get("labels") is not None:
            labels = np.asarray(example["labels"], dtype=np.int64).reshape(-1)
        else:
            for name in ("completion_mask", "assistant_masks"):
                if example.get(name) is not None:
                    keep = np.asarray(example[name], dtype=bool).reshape(-1)
                    labels = np.where(keep, ids, IGNORE_INDEX)
                    break
    if labels is None:
        return ids, np.arange(max(n - 1, 0), dtype=np.int64)
    if labels.shape[0] != n:
        raise ValueError(f"an example's labels ({labels.shape[0]}) and input_ids ({n}) differ in length.")
    valid = labels != IGNORE_INDEX
    if shift_labels:
        valid = np.concatenate([valid[1:], [False]])
    return ids, np.nonzero(valid)[0].astype(np.int64)


def _segments(
    ids: np.ndarray, attention: np.ndarray | None, position_ids: np.ndarray | None
) -> list[np.ndarray]:
    """Index arrays of the documents in one batch row: attended positions, split where position_ids restart at 0."""
    idx = np.arange(ids.shape[0]) if attention is None else np.nonzero(attention)[0]
    if idx.size == 0:
        return []
    if position_ids is None:
        return [idx]
    starts = np.nonzero(position_ids[idx] == 0)[0]
    starts = starts[starts > 0]
    return [s for s in np.split(idx, starts) if s.size]


def _split_lengths(ids: Sequence[int], lengths: Sequence[int]) -> list[list[int]]:
    out, s = [], 0
    for n in lengths:
        out.append(list(ids[s : s + int(n)]))
        s += int(n)
    return out


# ---------------------------------------------------------------------------------------------- the precompute
def _reference_rows(
    head, hidden: torch.Tensor, top_k: int, temperatures: Sequence[float], chunk_size: int
) -> dict[str, torch.Tensor]:
    """Top-k ids/logits and, per T, log-normaliser, tail log-mass and entropy of the rows ``hidden`` (M, d)."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in (*TENSORS[:2], *PER_T)}
    for s in range(0, hidden.shape[0], chunk_size):
        z = head.logits(hidden[s : s + chunk_size])
        top, ids = z.topk(min(top_k, z.shape[-1]), dim=-1)
        out["token_ids"].append(ids.to(torch.int32).cpu())
        out["logits"].append(top.cpu())
        per_t = {k: [] for k in PER_T}
        for t in temperatures:
            zt = z / t
            lse = zt.logsumexp(-1)
            p = (zt - lse[:, None]).exp_()
            per_t["entropy"].append(lse - (p * zt).sum(-1))
            per_t["log_normalizer"].append(lse)
            del p
            per_t["tail_log_mass"].append(zt.scatter_(1, ids, float("-inf")).logsumexp(-1) - lse)
            del zt
        for k, v in per_t.items():
            out[k].append(torch.stack(v, dim=1).cpu())
        del z
    return {k: torch.cat(v) for k, v in out.items()}


def _read_manifest(out: str) -> dict[str, Any] | None:
    path = os.path.join(out, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_manifest(out: str, manifest: dict[str, Any]) -> None:
    tmp = os.path.join(out, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out, MANIFEST))


def _own_files(out: str) -> list[str]:
    return [
        n
        for n in os.listdir(out)
        if n.startswith(MANIFEST) or (n.startswith("shard-") and ".safetensors" in n)
    ]


def precompute_reference(
    model: nn.Module,
    dataset: Sequence[Mapping[str, Any]],
    out: str,
    *,
    top_k: int = DEFAULT_TOP_K,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    positions: str = "labels",
    shift_labels: bool = True,
    batch_size: int = 8,
    shard_size: int = 1024,
    chunk_size: int = 256,
    settings: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the pre-trained causal LM ``model`` once over ``dataset`` and store its top-k reference in ``out``.

    Args:
        model: the untouched pre-trained model (not a PEFT model), in the dtype to run (bf16 halves the cost on
            a GPU; the logits are fp32 either way). Run under ``torch.inference_mode``, in eval mode.
        dataset: tokenised examples (a ``datasets.Dataset`` or a list of dicts) with ``input_ids`` and ``labels``
            (or TRL's ``completion_mask`` / ``assistant_masks``), exactly as the trainer will see them: the same
            tokenizer, chat template and max length (``balora reference`` tokenises raw data with TRL's own
            SFT preparation).
        out: the folder to write (``manifest.json`` + shards). A folder holding an unfinished run with the same
            settings is resumed; one holding anything else is refused unless ``overwrite``.
        top_k: reference logits kept per position (docs/precomputed_reference.md measures k = 32 - 128).
        temperatures: the T values the store serves (the training config's T must be one of them).
        positions: ``"labels"`` (the trained positions) or ``"all"`` (every position; see :func:`example_positions`).
        shift_labels: as ``BALoRAConfig.shift_labels``.
        batch_size: examples per forward (sorted by length within a shard, so padding stays small).
        shard_size: examples per shard file (the unit of resuming).
        chunk_size: positions per (chunk, |V|) fp32 logits block.
        settings: extra facts recorded in the manifest (e.g. ``max_length``, the tokenizer fingerprint).
        progress: show a progress bar (tqdm).

    Returns:
        The manifest (also written to ``out/manifest.json``).
    """
    if hasattr(model, "peft_config"):
        raise ValueError(
            "precompute_reference got a PEFT model; pass the untouched pre-trained model (the reference BA-LoRA "
            "compares with). For PiSSA that is the original base, not the residual one."
        )
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r} is not allowed; choose one of {list(POSITIONS)}.")
    if not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1 (e.g. {DEFAULT_TOP_K}).")
    temperatures = [float(t) for t in temperatures]
    if not temperatures or any(not t > 0 for t in temperatures):
        raise ValueError(f"temperatures={temperatures!r} must be numbers > 0 (the presets use 1 and 2).")
    if "seq_lengths" in (getattr(dataset, "column_names", None) or ()):
        raise ValueError(
            "the dataset is packed (it has seq_lengths): pass the tokenised examples before packing (TRL: "
            "balora_plugins.trl.sft_train_dataset; `balora reference` does this for raw data); training finds the "
            "documents of a packed row by their token ids."
        )
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty: nothing to precompute.")
    head = output_head(model)
    vocab = head.vocab_size
    top_k = min(top_k, vocab)
    first_ids, _ = example_positions(dataset[0], "all")
    probe_ids = [int(x) for x in first_ids[:PROBE_TOKENS]]
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "top_k": top_k,
        "vocab_size": vocab,
        "temperatures": temperatures,
        "positions": positions,
        "shift_labels": bool(shift_labels),
        "examples": n,
        "first_key": example_key(first_ids).hex(),
        "model": model_fingerprint(model),
        "settings": dict(settings or {}),
    }
    os.makedirs(out, exist_ok=True)
    manifest = _read_manifest(out)
    if manifest is not None and not overwrite:
        differ = [k for k in header if k != "settings" and manifest.get(k) != header[k]]
        if differ:
            raise FileExistsError(
                f"{out!r} holds a precomputed reference with other settings ({', '.join(differ)} differ, e.g. "
                f"{differ[0]}={manifest.get(differ[0])!r} there, {header[differ[0]]!r} now); pass overwrite=True "
                "(--overwrite) to replace it, or choose another folder."
            )
        if manifest.get("complete"):
            return manifest
    elif manifest is None and os.listdir(out) and not overwrite:
        raise FileExistsError(
            f"{out!r} is not empty and holds no {MANIFEST}; choose an empty folder or pass overwrite=True."
        )
    if manifest is None or overwrite:
        for name in _own_files(out):
            os.remove(os.path.join(out, name))
        probe = _probe_logits(model, probe_ids)
        top, ids = probe.topk(min(PROBE_TOP, vocab), dim=-1)
        header["probe"] = {"input_ids": probe_ids, "token_ids": ids.tolist(), "logits": top.tolist()}
        manifest = {**header, "complete": False, "done_examples": 0, "shards": [], "rows": 0, "tokens": 0}
        manifest["seconds"] = 0.0
        _write_manifest(out, manifest)
    seen: set[bytes] = set()
    for shard in manifest["shards"]:
        with safe_open(os.path.join(out, shard["file"]), framework="pt") as f:
            seen.update(bytes(k) for k in f.get_tensor("keys").numpy())
    backbone = decoder_of(model)
    device = next(model.parameters()).device
    start = int(manifest["done_examples"])
    bar = tqdm(total=n, initial=start, desc="reference", unit="ex", disable=not progress)
    was_training = model.training
    model.eval()
    try:
        for a in range(start, n, shard_size):
            t0 = time.perf_counter()
            block = []
            for i in range(a, min(a + shard_size, n)):
                ids, pos = example_positions(dataset[i], positions, shift_labels)
                key = example_key(ids)
                if key in seen:  # the same example twice: stored once
                    continue
                seen.add(key)
                block.append((key, ids, pos))
            rows, tokens = _run_block(
                backbone, head, block, device, top_k, temperatures, batch_size, chunk_size
            )
            name = SHARD.format(len(manifest["shards"]))
            tensors = {
                "keys": torch.tensor(
                    np.frombuffer(b"".join(k for k, _, _ in block), dtype=np.uint8).copy()
                ).reshape(len(block), KEY_BYTES)
                if block
                else torch.zeros(0, KEY_BYTES, dtype=torch.uint8),
                "lengths": torch.tensor([len(ids) for _, ids, _ in block], dtype=torch.int64),
                "row_offsets": torch.tensor(np.concatenate([[0], np.cumsum([len(p) for _, _, p in block])]))
                .to(torch.int64)
                .reshape(-1),
                **rows,
            }
            save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, name + ".tmp"))
            os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
            manifest["shards"].append(
                {"file": name, "examples": len(block), "rows": int(rows["positions"].shape[0])}
            )
            manifest["done_examples"] = min(a + shard_size, n)
            manifest["rows"] += int(rows["positions"].shape[0])
            manifest["tokens"] += tokens
            manifest["seconds"] += time.perf_counter() - t0
            _write_manifest(out, manifest)
            bar.update(manifest["done_examples"] - a)
    finally:
        bar.close()
        model.train(was_training)
    manifest["distinct_examples"] = len(seen)
    manifest["dataset_fingerprint"] = dataset_fingerprint(seen)
    manifest["complete"] = True
    _write_manifest(out, manifest)
    return manifest


def _run_block(backbone, head, block, device, top_k, temperatures, batch_size, chunk_size):
    """The stored tensors of one shard's examples (in ``block`` order) and the tokens the forwards ran."""
    order = sorted(range(len(block)), key=lambda j: len(block[j][1]))
    per_example: dict[int, dict[str, torch.Tensor]] = {}
    tokens = 0
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            batch = order[b : b + batch_size]
            width = max(len(block[j][1]) for j in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            attn = torch.zeros(len(batch), width, dtype=torch.long)
            for r, j in enumerate(batch):
                ids[r, : len(block[j][1])] = torch.from_numpy(block[j][1])
                attn[r, : len(block[j][1])] = 1
            tokens += int(attn.sum())
            out = backbone(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            sel = [hidden[r, torch.from_numpy(block[j][2]).to(device)] for r, j in enumerate(batch)]
            rows = _reference_rows(head, torch.cat(sel), top_k, temperatures, chunk_size)
            s = 0
            for r, j in enumerate(batch):
                m = sel[r].shape[0]
                per_example[j] = {k: v[s : s + m] for k, v in rows.items()}
                per_example[j]["positions"] = torch.from_numpy(block[j][2]).to(torch.int32)
                s += m
    names = (*TENSORS, *PER_T)
    if not block:
        k, nt = top_k, len(temperatures)
        empty = {"token_ids": (0, k), "logits": (0, k), "positions": (0,), **{x: (0, nt) for x in PER_T}}
        dtypes = {"token_ids": torch.int32, "positions": torch.int32}
        return {x: torch.zeros(empty[x], dtype=dtypes.get(x, torch.float32)) for x in names}, tokens
    return {x: torch.cat([per_example[j][x] for j in range(len(block))]) for x in names}, tokens


# ---------------------------------------------------------------------------------------------- reading
class ReferenceStore:
    """A finished precompute, opened for reading: the manifest, an index from key to example, lazy shard reads.

    Only the keys and row offsets are read at open (about 40 bytes per example); rows are read per micro-batch,
    by slices of the memory-mapped shards, so every rank of a multi-GPU run reads just the rows of its batches.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        manifest = _read_manifest(self.path) if os.path.isdir(self.path) else None
        if manifest is None:
            raise FileNotFoundError(
                f"BALoRAConfig.reference_path={self.path!r} holds no {MANIFEST}: point it at the folder "
                "`balora reference DATA --model BASE --out FOLDER` wrote (docs/precomputed_reference.md)."
            )
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.path!r} is not a BA-LoRA precomputed reference of format version {FORMAT_VERSION} (it says "
                f"format={manifest.get('format')!r}, version={manifest.get('version')!r}); run `balora reference` "
                "again with this version of balora-plugins."
            )
        if not manifest.get("complete"):
            raise ValueError(
                f"the precomputed reference in {self.path!r} is unfinished ({manifest.get('done_examples')} of "
                f"{manifest.get('examples')} examples): run the same `balora reference` command again, it resumes."
            )
        self.manifest = manifest
        self._files = [os.path.join(self.path, s["file"]) for s in manifest["shards"]]
        self._handles: dict[int, Any] = {}
        # key -> (shard, first row, row count, example length)
        self.index: dict[bytes, tuple[int, int, int, int]] = {}
        for s in range(len(self._files)):
            f = self._open(s)
            keys, offsets = f.get_tensor("keys").numpy(), f.get_tensor("row_offsets").numpy()
            lengths = f.get_tensor("lengths").numpy()
            for e in range(keys.shape[0]):
                self.index[bytes(keys[e])] = (
                    s,
                    int(offsets[e]),
                    int(offsets[e + 1] - offsets[e]),
                    int(lengths[e]),
                )

    def _open(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(self._files[shard], framework="pt")
        return self._handles[shard]

    @property
    def temperatures(self) -> list[float]:
        return [float(t) for t in self.manifest["temperatures"]]

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    def read(self, shard: int, first: int, count: int, t_index: int) -> dict[str, torch.Tensor]:
        """One example's stored rows: ``positions`` (count,), ``token_ids``/``logits`` (count, k), the per-T columns
        (count,) at temperature index ``t_index``."""
        f = self._open(shard)
        sl = slice(first, first + count)
        rows = {name: f.get_slice(name)[sl] for name in TENSORS}
        for name in PER_T:
            rows[name] = f.get_slice(name)[sl][:, t_index]
        return rows

    def describe(self) -> str:
        """The recorded facts a mismatch is usually about (for error messages)."""
        settings = self.manifest.get("settings") or {}
        facts = [f"{len(self.index)} examples", f"positions={self.manifest.get('positions')!r}"]
        facts += [f"{k}={v!r}" for k, v in settings.items() if k in ("max_length", "tokenizer", "source")]
        return ", ".join(facts)


class PrecomputedReference:
    """The reference source of a ``reference='precomputed'`` run: the stored top-k rows of each micro-batch.

    Chosen once at :meth:`~balora_plugins.core.objective.BALoRAObjective.prepare` by the NLG rows strategy
    (:class:`~balora_plugins.core.rows.TokenRows`), which asks it for the rows of the valid positions (:meth:`rows`)
    where an online source runs the reference forward.
    """

    def __init__(self, path: str | os.PathLike, temperature: float):
        self.store = ReferenceStore(path)
        temps = self.store.temperatures
        match = [i for i, t in enumerate(temps) if math.isclose(t, float(temperature), rel_tol=1e-6)]
        if not match:
            raise ValueError(
                f"BALoRAConfig.temperature={temperature!r} but the precomputed reference in {self.store.path!r} "
                f"stores T in {temps}; run `balora reference ... --temperatures {temperature:g}` (or set the "
                "temperature to a stored one)."
            )
        self.t_index = match[0]
        self.temperature = float(temperature)

    # ------------------------------------------------------------------ checks before step 1
    def check_model(self, model: nn.Module, base: nn.Module) -> None:
        """Refuse a store computed from another model than the one being trained.

        ``model`` runs at step 0 (for every accepted init it *is* the reference); ``base`` is its base model
        (architecture settings, revision). Checked: the architecture settings, the revision where both are known,
        and the logits on the stored probe sequence (relative difference ≤ :data:`PROBE_TOL`) where the weights
        are materialised (not ZeRO-3 placeholders).
        """
        stored = self.store.manifest["model"]
        now = model_fingerprint(base)
        where = f"the precomputed reference in {self.store.path!r} (model {stored.get('name_or_path')!r})"
        differ = [
            f"{k}: {stored['architecture'].get(k)!r} there, {now['architecture'].get(k)!r} here"
            for k in sorted(set(stored["architecture"]) | set(now["architecture"]))
            if stored["architecture"].get(k) != now["architecture"].get(k)
        ]
        if differ:
            raise ValueError(
                f"{where} was computed from another model than the one being trained ({'; '.join(differ)}). Run "
                "`balora reference` with this model (its untouched pre-trained base)."
            )
        if stored.get("revision") and now.get("revision") and stored["revision"] != now["revision"]:
            raise ValueError(
                f"{where} was computed from revision {stored['revision']!r}, the model being trained is revision "
                f"{now['revision']!r}. Run `balora reference` again with this revision."
            )
        if not probe_possible(model):  # ZeRO-3 placeholders: the fingerprint above is all that can be read
            return
        probe = self.store.manifest["probe"]
        logits = _probe_logits(model, probe["input_ids"])
        ids = torch.tensor(probe["token_ids"], device=logits.device)
        want = torch.tensor(probe["logits"], device=logits.device)
        got = logits.gather(1, ids)
        err = float((got - want).norm() / want.norm().clamp(min=1e-12))
        if not err <= PROBE_TOL:
            raise ValueError(
                f"{where} does not match the model being trained at step 0: its logits on the stored probe differ "
                f"by {err:.3g} (relative; at most {PROBE_TOL} is accepted, bf16 against fp32 is ~1e-2). The store "
                "was computed from another model or revision — or, with PiSSA, from a residual base (W - B0A0) "
                "instead of the untouched pre-trained model: the reference is the untouched model (W_res + B0A0 = "
                "W). Run `balora reference` with the untouched pre-trained model."
            )

    def check_kernels(self, terms: Sequence[Any], weights: Mapping[str, float]) -> None:
        """Every reference-using term must take a top-k reference (``accepts_topk_reference`` on its kernel)."""
        for t in terms:
            if t.needs_reference and weights.get(t.name, 0.0) > 0:
                kernel = as_row_kernel(t.row_kernel())
                if not kernel.accepts_topk_reference:
                    raise ValueError(
                        f"BA-LoRA term {t.name!r} needs the reference but its kernel ({type(kernel).__name__}) takes "
                        "only full reference logits, which reference='precomputed' does not store. Use "
                        "reference='auto' for this term, or give its kernel a top-k form (accepts_topk_reference)."
                    )

    def check_dataset(self, dataset: Any) -> None:
        """Refuse, before step 1, a training dataset with examples (or trained positions) the store lacks.

        ``dataset``: the trainer's tokenised dataset (``input_ids``; packed rows with ``seq_lengths`` or
        ``position_ids`` are split into their documents; with ``labels`` the trained positions are checked too).
        Datasets without ``input_ids`` (not tokenised yet, streamed) are checked at each step instead.
        """
        columns = getattr(dataset, "column_names", None)
        if columns is None or "input_ids" not in columns:
            return
        ids_col = dataset["input_ids"]
        lengths = dataset["seq_lengths"] if "seq_lengths" in columns else None
        pos_col = dataset["position_ids"] if "position_ids" in columns else None
        labels = dataset["labels"] if "labels" in columns and lengths is None and pos_col is None else None
        missing, uncovered, total = [], [], 0
        for i, ids in enumerate(ids_col):
            if lengths is not None:
                docs = _split_lengths(ids, lengths[i])
            elif pos_col is not None:
                arr = np.asarray(ids)
                docs = [arr[s] for s in _segments(arr, None, np.asarray(pos_col[i]))]
            else:
                docs = [ids]
            for doc in docs:
                total += 1
                entry = self.store.index.get(example_key(doc))
                if entry is None:
                    missing.append((i, len(doc)))
                    continue
                if labels is not None:
                    _, want = example_positions(
                        {"input_ids": doc, "labels": labels[i]},
                        "labels",
                        bool(self.store.manifest.get("shift_labels", True)),
                    )
                    have = self.store.read(entry[0], entry[1], entry[2], self.t_index)["positions"].numpy()
                    if not np.isin(want, have).all():
                        uncovered.append(i)
        if missing:
            i, n = missing[0]
            raise ValueError(
                f"{len(missing)} of {total} training examples have no row in the precomputed reference "
                f"{self.store.path!r} (first: example {i}, {n} tokens). The dataset, tokenizer, chat template or "
                f"max length differ from the precompute (it recorded: {self.store.describe()}). Run `balora "
                "reference` on this training data with the trainer's settings, or train with reference='auto'."
            )
        if uncovered:
            raise ValueError(
                f"{len(uncovered)} training examples (first: example {uncovered[0]}) train positions the precomputed "
                f"reference {self.store.path!r} did not store: the labels differ from the precompute's "
                f"(completion-only / assistant-only loss changed?; it recorded: {self.store.describe()}). Run `balora "
                "reference` with the trainer's label settings, or with --positions all."
            )

    # ------------------------------------------------------------------ per micro-batch
    def rows(self, model: nn.Module, inputs: Mapping[str, Any], mask: torch.Tensor) -> TopKRows:
        """The stored reference of the valid positions ``mask`` (B, T) of the micro-batch ``inputs``, in the
        row-major order of ``hidden[mask]``, on ``mask``'s device."""
        ids = inputs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(
                "reference='precomputed' finds an example's rows by its token ids: the batch needs `input_ids` "
                "(B, T); inputs_embeds-only batches need reference='auto'."
            )
        ids_np = ids.detach().to("cpu").numpy()
        attn = inputs.get("attention_mask")
        attn_np = (
            attn.detach().to("cpu").numpy() if isinstance(attn, torch.Tensor) and attn.dim() == 2 else None
        )
        pos = inputs.get("position_ids")
        pos_np = pos.detach().to("cpu").reshape(ids.shape).numpy() if isinstance(pos, torch.Tensor) else None
        mask_np = mask.detach().to("cpu").numpy()
        width = mask_np.shape[1]
        parts: list[dict[str, torch.Tensor]] = []
        flat: list[np.ndarray] = []
        for b in range(ids_np.shape[0]):
            want_b = mask_np[b]
            if not want_b.any():
                continue
            covered = np.zeros(width, dtype=bool)
            segs = _segments(
                ids_np[b], None if attn_np is None else attn_np[b], None if pos_np is None else pos_np[b]
            )
            for seg in segs:
                covered[seg] = True
                local = np.nonzero(want_b[seg])[0]
                if local.size == 0:
                    continue
                entry = self.store.index.get(example_key(ids_np[b][seg]))
                if entry is None:
                    raise ValueError(
                        f"an example of this micro-batch ({seg.size} tokens, row {b}) has no row in the precomputed "
                        f"reference {self.store.path!r}: the dataset, tokenizer, chat template or max length differ "
                        f"from the precompute (it recorded: {self.store.describe()}). Run `balora reference` on this "
                        "training data with the trainer's settings."
                    )
                rows = self.store.read(*entry[:3], self.t_index)
                stored = rows["positions"].numpy()
                at = np.searchsorted(stored, local)
                ok = (at < stored.size) & (stored[np.minimum(at, stored.size - 1)] == local)
                if not ok.all():
                    raise ValueError(
                        f"position {int(local[~ok][0])} of an example ({seg.size} tokens) is trained but has no row "
                        f"in the precomputed reference {self.store.path!r}: the labels differ from the precompute's "
                        f"(it recorded: {self.store.describe()}). Run `balora reference` with the trainer's label "
                        "settings, or with --positions all."
                    )
                sel = torch.from_numpy(at)
                parts.append({k: v[sel] for k, v in rows.items() if k != "positions"})
                flat.append(b * width + seg[local])
            if (want_b & ~covered).any():
                raise ValueError("a trained position lies outside every attended document of its row.")
        if not parts:
            k = self.store.top_k
            empty = TopKRows(
                torch.zeros(0, k, dtype=torch.long),
                torch.zeros(0, k),
                torch.zeros(0),
                torch.zeros(0),
                torch.zeros(0),
                self.temperature,
            )
            return empty.to(mask.device)
        order = torch.from_numpy(np.argsort(np.concatenate(flat), kind="stable"))
        cat = {k: torch.cat([p[k] for p in parts])[order] for k in parts[0]}
        out = TopKRows(
            cat["token_ids"].long(),
            cat["logits"].float(),
            cat["log_normalizer"].float(),
            cat["tail_log_mass"].float(),
            cat["entropy"].float(),
            self.temperature,
        )
        return out.to(mask.device)

    def mean_entropy(self, ref_rows: TopKRows) -> tuple[float, int]:
        """(mean stored entropy of softmax(z_ref/T) over the rows, |V|): the adaptive λ1's confidence inputs."""
        return float(ref_rows.entropy.mean()), int(self.store.manifest["vocab_size"])
