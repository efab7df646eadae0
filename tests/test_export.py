"""Export (docs/method.md §1): a PiSSA-trained adapter becomes a plain LoRA adapter serving on the untouched base model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import batch, lora, tiny_llama
from peft import PeftModel
from safetensors.torch import load_file

from balora_plugins import BALoRAConfig
from balora_plugins.core.export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    INITIAL_DIR,
    RESUME_DIR,
    export_merged,
    export_plain_lora,
    find_initial_adapter,
    load_initial_adapter,
    resume_adapter_dir,
    save_initial_adapter,
    write_servable_layout,
)
from balora_plugins.core.reference import REF_ADAPTER, add_snapshot_adapter, reference_mode


def _fwd(inputs):
    return {k: v for k, v in inputs.items() if k != "labels"}


def _train(model, steps=4, lr=2e-2):
    """A few plain-torch optimizer steps on the LM loss (large lr so the adapter really moves)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for s in range(steps):
        model(**batch(seed=s)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _trained_dir(tmp_path, init="pissa", **lora_kw):
    model = lora(tiny_llama(), init=init, **lora_kw)
    add_snapshot_adapter(model)
    _train(model)
    adapter_dir = str(tmp_path / "adapter")
    model.save_pretrained(adapter_dir, selected_adapters=["default"])
    save_initial_adapter(model, os.path.join(adapter_dir, INITIAL_DIR), REF_ADAPTER)
    return model, adapter_dir


def _served(path):
    """Plain PEFT on a fresh, untouched base model: what a user serves."""
    return PeftModel.from_pretrained(tiny_llama(), path).eval()


def test_pissa_export_serves_on_untouched_base(tmp_path):
    model, adapter_dir = _trained_dir(tmp_path)
    inputs = _fwd(batch(b=3, seed=9))
    with torch.no_grad():
        trained = model(**inputs).logits
        base = tiny_llama()(**inputs).logits
    assert (trained - base).abs().max() > 1e-2  # training moved the model
    out = export_plain_lora(adapter_dir, str(tmp_path / "plain"))
    with open(os.path.join(out, ADAPTER_CONFIG)) as f:
        cfg = json.load(f)
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    served = _served(out)
    with torch.no_grad():
        torch.testing.assert_close(served(**inputs).logits, trained, rtol=0, atol=1e-5)
    # and it runs on the untouched weights W (no PiSSA residual computed at load time, as in a serving engine)
    fresh = dict(tiny_llama().named_parameters())
    for n, p in served.get_base_model().named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, fresh[n.replace(".base_layer", "")]), n
    with open(os.path.join(adapter_dir, INITIAL_DIR, ADAPTER_CONFIG)) as f:
        assert json.load(f)["init_lora_weights"] is True  # PEFT must not re-run PiSSA when loading it


def test_export_matches_peft_weight_conversion(tmp_path):
    """Our state-dict conversion equals PEFT's own `path_initial_model_for_weight_conversion`."""
    model, adapter_dir = _trained_dir(tmp_path)
    ours = load_file(os.path.join(export_plain_lora(adapter_dir, str(tmp_path / "ours")), ADAPTER_WEIGHTS))
    peft_dir = str(tmp_path / "peft")
    model.save_pretrained(
        peft_dir,
        selected_adapters=["default"],
        path_initial_model_for_weight_conversion=os.path.join(adapter_dir, INITIAL_DIR),
    )
    theirs = load_file(os.path.join(peft_dir, ADAPTER_WEIGHTS))
    assert ours.keys() == theirs.keys() and ours
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0, msg=k)


def test_rslora_and_alpha_pattern_scaling(tmp_path):
    model, adapter_dir = _trained_dir(
        tmp_path, use_rslora=True, alpha=6, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}
    )
    out = export_plain_lora(adapter_dir, str(tmp_path / "plain"))
    with open(os.path.join(out, ADAPTER_CONFIG)) as f:
        cfg = json.load(f)
    assert cfg["r"] == 8 and cfg["lora_alpha"] == pytest.approx(6 * 2**0.5)  # α/√r kept: α' = √2·α
    assert cfg["rank_pattern"] == {"v_proj": 4} and cfg["alpha_pattern"] == {
        "o_proj": pytest.approx(3 * 2**0.5)
    }
    inputs = _fwd(batch(seed=10))
    with torch.no_grad():
        torch.testing.assert_close(_served(out)(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-5)


def test_refuses_non_empty_out_dir(tmp_path):
    _, adapter_dir = _trained_dir(tmp_path)
    out = tmp_path / "plain"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        export_plain_lora(adapter_dir, str(out))
    assert not (out / ADAPTER_WEIGHTS).exists()
    export_plain_lora(adapter_dir, str(out), overwrite=True)
    assert (out / ADAPTER_WEIGHTS).exists()


def test_missing_initial_adapter_explains(tmp_path):
    model = lora(tiny_llama(), init="pissa")
    model.save_pretrained(str(tmp_path / "a"))
    assert find_initial_adapter(str(tmp_path / "a")) is None
    with pytest.raises(FileNotFoundError, match=r"initial adapter is missing.*balora_ref/"):
        export_plain_lora(str(tmp_path / "a"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        export_plain_lora(str(tmp_path / "nothing"), str(tmp_path / "out"))


def test_plain_lora_init_adapter_is_copied_unchanged(tmp_path):
    model = lora(tiny_llama(), init=True)
    _train(model, steps=2)
    src = str(tmp_path / "adapter")
    model.save_pretrained(src)
    out = export_plain_lora(src, str(tmp_path / "plain"))
    a, b = load_file(os.path.join(src, ADAPTER_WEIGHTS)), load_file(os.path.join(out, ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with open(os.path.join(src, ADAPTER_CONFIG)) as f, open(os.path.join(out, ADAPTER_CONFIG)) as g:
        assert json.load(f) == json.load(g)
    inputs = _fwd(batch())
    with torch.no_grad():
        torch.testing.assert_close(_served(out)(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-6)


def test_load_initial_adapter_restores_reference(tmp_path):
    """On resume the reference comes back from disk, not from the (trained) current weights."""
    model, adapter_dir = _trained_dir(tmp_path)
    inputs = _fwd(batch())
    with torch.no_grad():
        base = tiny_llama()(**inputs).logits
    resumed = lora(tiny_llama(), init="pissa")  # fresh PiSSA model, then the trained weights loaded
    add_snapshot_adapter(resumed)
    resumed.load_adapter(adapter_dir, adapter_name="default", is_trainable=True)
    trainable = {n for n, p in resumed.named_parameters() if p.requires_grad}
    add_snapshot_adapter(resumed)  # would copy the *trained* weights: the wrong reference ...
    with reference_mode(resumed, "adapter_snapshot"):
        assert (resumed(**inputs).logits - base).abs().max() > 1e-2
    load_initial_adapter(resumed, os.path.join(adapter_dir, INITIAL_DIR))  # ... until the saved one is loaded
    with reference_mode(resumed, "adapter_snapshot"):
        torch.testing.assert_close(resumed(**inputs).logits, base, rtol=0, atol=2e-6)
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == trainable


# ---------------------------------------------------------------------------------------------- final layout
def _digest(folder) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
        for d, _, fs in os.walk(folder)
        for f in fs
    }


def test_servable_layout_moves_the_trainable_form_and_is_idempotent(tmp_path):
    """0.1.0's layout (PiSSA adapter + balora_ref/ at the root) becomes the final layout: the plain LoRA at the root
    (serves on the untouched base), the original files unchanged in balora_resume/; every reader follows."""
    model, adapter_dir = _trained_dir(tmp_path)
    BALoRAConfig().save_pretrained(adapter_dir)
    before = _digest(adapter_dir)
    assert resume_adapter_dir(adapter_dir) == adapter_dir  # 0.1.0 / checkpoint layout
    assert find_initial_adapter(adapter_dir) == os.path.join(adapter_dir, INITIAL_DIR)

    resume = write_servable_layout(adapter_dir)
    assert resume == os.path.join(adapter_dir, RESUME_DIR)
    before.pop("README.md")  # the model card stays at the root
    assert _digest(resume) == before  # the trainable form, byte for byte
    assert sorted(os.listdir(adapter_dir)) == sorted(
        [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "balora_config.json", "README.md", RESUME_DIR]
    )
    inputs = _fwd(batch(b=3, seed=9))
    with torch.no_grad():
        torch.testing.assert_close(
            _served(adapter_dir)(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-5
        )
    assert resume_adapter_dir(adapter_dir) == resume
    assert find_initial_adapter(adapter_dir) == os.path.join(resume, INITIAL_DIR)
    # balora export on the root copies it (already plain); on balora_resume/ converts to the same adapter
    root = load_file(os.path.join(export_plain_lora(adapter_dir, str(tmp_path / "a")), ADAPTER_WEIGHTS))
    again = load_file(os.path.join(export_plain_lora(resume, str(tmp_path / "b")), ADAPTER_WEIGHTS))
    assert root.keys() == again.keys() and all(torch.equal(root[k], again[k]) for k in root)

    after = _digest(adapter_dir)
    assert write_servable_layout(adapter_dir) is None and _digest(adapter_dir) == after  # idempotent
    # a later save (the host writes the trainable form to the root again) refreshes our own balora_resume/
    model.save_pretrained(adapter_dir, selected_adapters=["default"])
    assert write_servable_layout(adapter_dir) == resume and _digest(adapter_dir) == after


def test_servable_layout_never_replaces_a_folder_it_did_not_write(tmp_path):
    _, adapter_dir = _trained_dir(tmp_path)
    foreign = os.path.join(adapter_dir, RESUME_DIR)
    os.makedirs(foreign)
    with open(os.path.join(foreign, "notes.txt"), "w") as f:
        f.write("mine")
    before = _digest(adapter_dir)
    with pytest.raises(FileExistsError, match="not written by BA-LoRA"):
        write_servable_layout(adapter_dir)
    assert _digest(adapter_dir) == before


def test_merged_export_keeps_the_base_dtype(tmp_path):
    """A bf16 base gives a bf16 merged model: the float32 merge rounded once to bf16 (at most one bf16 ulp apart),
    whose logits are the trained model's up to bf16 rounding."""
    from transformers import AutoModelForCausalLM

    base = tiny_llama().to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    model = lora(base.float(), init="pissa")  # the bf16 weights, trained in float32
    add_snapshot_adapter(model)
    _train(model)
    adapter_dir = str(tmp_path / "adapter")
    model.save_pretrained(adapter_dir)
    BALoRAConfig().save_pretrained(adapter_dir)
    write_servable_layout(adapter_dir)  # the final output: plain LoRA at the root
    auto = export_merged(adapter_dir, str(tmp_path / "auto"), base=str(tmp_path / "base"))
    fp32 = export_merged(adapter_dir, str(tmp_path / "fp32"), base=str(tmp_path / "base"), dtype="float32")
    w_auto, w_fp32 = (load_file(os.path.join(d, "model.safetensors")) for d in (auto, fp32))
    assert {v.dtype for v in w_auto.values()} == {torch.bfloat16}
    assert {v.dtype for v in w_fp32.values()} == {torch.float32}
    for k in w_auto:
        torch.testing.assert_close(w_auto[k].float(), w_fp32[k], rtol=2**-7, atol=1e-6, msg=k)
    with open(os.path.join(auto, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    inputs = _fwd(batch(seed=10))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(auto).eval()(**inputs).logits.float()
        torch.testing.assert_close(merged, model.eval()(**inputs).logits, rtol=0, atol=5e-2)
    with pytest.raises(ValueError, match="dtype='int8' is not allowed"):
        export_merged(adapter_dir, str(tmp_path / "x"), base=str(tmp_path / "base"), dtype="int8")
