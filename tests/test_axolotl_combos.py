"""The axolotl settings users combine with BA-LoRA: end to end on CPU where axolotl runs there (multipack,
DoRA, the qkv/o LoRA kernels, gradient checkpointing, QLoRA), at config validation where it does not (Liger,
cut-cross-entropy: Triton/CUDA), and the fused-loss forward those plugins install, on a CPU stand-in.

The compatibility table in balora_plugins/axolotl/README.md lists each combination and how it is covered.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.axolotl
pytest.importorskip("axolotl")

from axolotl.integrations.base import PluginManager  # noqa: E402
from conftest import batch, lora, plain_peft_logits, tiny_llama  # noqa: E402
from test_axolotl import validate  # noqa: E402  (the tiny config through axolotl's validation)

from balora_plugins.axolotl.args import PLUGIN, balora_config_from_cfg  # noqa: E402
from balora_plugins.config import BALoRAConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LIGER = "axolotl.integrations.liger.LigerPlugin"
CCE = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"


def run_tiny_module():
    """``integrations/axolotl/run_tiny.py`` as a module."""
    spec = importlib.util.spec_from_file_location(
        "run_tiny", ROOT / "integrations" / "axolotl" / "run_tiny.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tiny(workdir: Path, *overrides: str, hidden: int = 32) -> dict:
    """``integrations/axolotl/run_tiny.py`` (``axolotl train --launcher python`` on a tiny random Llama) with
    ``--set`` overrides; it checks the metrics, the step-1 consistency (0: the model is its reference), the
    saved artefacts and, for PiSSA, the plain-LoRA export against an independent reconstruction."""
    args = ["--workdir", str(workdir), "--hidden", str(hidden)]
    for item in overrides:
        args += ["--set", item]
    return run_tiny_module().main(args)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_pissa_with_multipack_dora_lora_kernels_and_gradient_checkpointing_end_to_end(tmp_path):
    """One `axolotl train` run combining what axolotl users switch on: sample packing (multipack, SDPA),
    DoRA, the fused qkv/o LoRA kernels and gradient checkpointing, on PiSSA."""
    result = run_tiny(
        tmp_path,
        "sample_packing=true",
        "pad_to_sequence_len=false",
        "attn_implementation=sdpa",
        "sdp_attention=null",
        "flash_attention=null",
        "peft_use_dora=true",
        "lora_qkv_kernel=true",
        "lora_o_kernel=true",
        "gradient_checkpointing=true",
    )
    assert (
        result["steps"] == 4 and result["served_max_abs_err"] < 1e-4 and result["merged_max_abs_err"] < 1e-4
    )
    log = (tmp_path / "axolotl.log").read_text()
    # each setting was live in the run, not silently dropped
    assert "multipack" in log and "Patched attention class with LoRA optims" in log
    assert "LoRA kernels: DoRA enabled" in log and '"gradient_checkpointing": true' in log
    out = tmp_path / "outputs" / "tiny-balora"
    trained = json.loads((out / "balora_resume" / "adapter_config.json").read_text())
    assert trained["use_dora"] is True and trained["init_lora_weights"] == "pissa"
    served = json.loads((out / "adapter_config.json").read_text())  # the root: DoRA as plain-init LoRA
    assert served["use_dora"] is True and served["init_lora_weights"] is True


@pytest.mark.slow
def test_checkpoints_serve_on_the_untouched_base_and_resume_exactly(tmp_path):
    """`axolotl train` with save_steps=2: checkpoint-2 and checkpoint-4 roots, loaded with plain PEFT on the
    untouched base, equal `balora export` of their balora_resume/; `resume_from_checkpoint: checkpoint-2` trains
    steps 3-4 to the same losses as the uninterrupted run."""
    from balora_plugins.core.export import export_plain_lora

    module = run_tiny_module()
    settings = {"save_strategy": "steps", "save_steps": 2}
    module.main(
        ["--workdir", str(tmp_path), *(a for k, v in settings.items() for a in ("--set", f"{k}={v}"))]
    )
    full = {
        i + 1: float(s["loss"])
        for i, s in enumerate(module.logged_metrics((tmp_path / "axolotl.log").read_text()))
    }
    out = tmp_path / "outputs" / "tiny-balora"
    ids = torch.randint(4, 40, (2, 16), generator=torch.Generator().manual_seed(1)).tolist()
    base = {"base": "pretrained", "base_kwargs": {"path": str(tmp_path / "tiny-llama")}, "input_ids": ids}
    jobs = []
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        root = json.loads((ckpt / "adapter_config.json").read_text())
        trained = json.loads((ckpt / "balora_resume" / "adapter_config.json").read_text())
        assert root["init_lora_weights"] is True and trained["init_lora_weights"] == "pissa"
        assert root["r"] == 2 * trained["r"] and (ckpt / "balora_resume" / "balora_ref").is_dir()
        exported = export_plain_lora(str(ckpt / "balora_resume"), str(tmp_path / f"export-{step}"))
        jobs += [{"adapter": str(ckpt), **base}, {"adapter": exported, **base}]
    served = plain_peft_logits(jobs, tmp_path / "logits")
    for i in (0, 2):
        torch.testing.assert_close(served[i], served[i + 1], rtol=0, atol=1e-5)
    assert (
        served[0] - served[2]
    ).abs().max() > 1e-4  # the two checkpoints differ: the comparison is not vacuous

    module.preflight(tmp_path, {**settings, "resume_from_checkpoint": "./outputs/tiny-balora/checkpoint-2"})
    resumed = module.logged_metrics(module.run_axolotl(tmp_path))
    assert [float(s["loss"]) for s in resumed] == pytest.approx([full[3], full[4]], rel=1e-3)


@pytest.mark.slow
def test_qlora_with_plain_init_end_to_end(tmp_path):
    """QLoRA (4-bit bitsandbytes base, plain LoRA init): the reference is the disabled adapter, i.e. the
    quantised pre-trained model; gradient checkpointing on, as QLoRA users run it."""
    result = run_tiny(
        tmp_path,
        "adapter=qlora",
        "load_in_4bit=true",
        "peft_init_lora_weights=null",
        "gradient_checkpointing=true",
        hidden=64,  # bitsandbytes' CPU 4-bit path needs rows of >= 64 values
    )
    assert result["steps"] == 4 and "served_max_abs_err" not in result  # plain init: the root is the adapter
    out = tmp_path / "outputs" / "tiny-balora"
    assert not (out / "balora_resume").exists()  # plain init: the adapter already serves on the base
    assert json.loads((out / "balora_config.json").read_text())["reference"] == "auto"
    from safetensors.torch import load_file

    trained = load_file(out / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in trained.items())  # B left 0
    log = (tmp_path / "axolotl.log").read_text()
    assert '"load_in_4bit": true' in log and '"gradient_checkpointing": true' in log


@pytest.mark.slow
def test_qpissa_end_to_end(tmp_path):
    """QPiSSA (`adapter: qlora`, `load_in_4bit: true`, PiSSA init): the plugin factorises the full-precision
    weights of `base_model` and re-quantises the residual; the consistency term is 0 at step 1 (the reference
    is the step-0 model Q(W_res) + s·B0A0); the root is the plain LoRA for the untouched full-precision base,
    equal to the trained adapter on the full-precision residual W − s·B0A0 (run_tiny's independent rebuild), and
    `axolotl merge-lora` merges it into the full-precision base."""
    result = run_tiny(
        tmp_path,
        "adapter=qlora",
        "load_in_4bit=true",
        "peft_init_lora_weights=pissa_niter_4",
        hidden=64,  # bitsandbytes' CPU 4-bit path needs rows of >= 64 values
    )
    assert (
        result["steps"] == 4 and result["served_max_abs_err"] < 1e-4 and result["merged_max_abs_err"] < 1e-4
    )
    out = tmp_path / "outputs" / "tiny-balora"
    trained = json.loads((out / "balora_resume" / "adapter_config.json").read_text())
    assert (
        trained["init_lora_weights"] == "pissa_niter_4"
        and trained["r"] * 2 == json.loads((out / "adapter_config.json").read_text())["r"]
    )
    log = (tmp_path / "axolotl.log").read_text()
    assert '"load_in_4bit": true' in log and "QPiSSA (pissa_niter_4) on" in log
    assert "Trained on a 4-bit residual" in (out / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- second plugin
@pytest.mark.parametrize(
    "plugins, keys",
    [
        (
            [LIGER, PLUGIN],
            {"liger_rms_norm": True, "liger_glu_activation": True, "liger_fused_linear_cross_entropy": True},
        ),
        ([PLUGIN, LIGER], {"liger_rope": True, "liger_fused_linear_cross_entropy": True}),
        ([CCE, PLUGIN], {"cut_cross_entropy": True, "bf16": True}),
    ],
)
def test_liger_and_cut_cross_entropy_compose_at_validation_and_leave_the_trainer_to_balora(plugins, keys):
    """Liger and cut-cross-entropy run Triton kernels (CUDA only), so they compose here at config level: both
    keys sets validate beside the balora_* keys, and BA-LoRA's trainer is the one axolotl builds."""
    from balora_plugins.axolotl.trainer import AxolotlBALoRATrainer

    cfg = validate(plugins=plugins, balora_lambda_svd=0.01, **keys)
    assert all(cfg[k] == v for k, v in keys.items())
    assert balora_config_from_cfg(cfg).lambda_svd == 0.01
    assert issubclass(PluginManager.get_instance().get_trainer_cls(cfg), AxolotlBALoRATrainer)


def test_terms_are_unchanged_under_a_fused_loss_forward_that_returns_no_logits(monkeypatch):
    """Liger's fused linear cross-entropy and cut-cross-entropy replace ``LlamaForCausalLM.forward`` with one that
    computes the loss without materialising logits. BA-LoRA reads the decoder's hidden states and the frozen head,
    so its terms and their gradients do not change. CPU stand-in for the Triton kernels: the same replacement
    written in torch (the decoder, then cross-entropy from hidden states, ``logits=None``)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    from balora_plugins.core.objective import BALoRAObjective

    def fused_forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        logits = self.lm_head(hidden[:, :-1]).flatten(0, 1)  # what the fused kernels compute chunk by chunk
        loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    config = BALoRAConfig(lambda_consistency=1.0, lambda_diversity=0.1, lambda_svd=0.1, svd_top_k=2)

    def step(fused: bool):
        torch.manual_seed(0)
        model = lora(tiny_llama(seed=4), init="pissa", task_type="CAUSAL_LM")
        objective = BALoRAObjective(config).prepare(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".default." in name:
                    p.add_(0.05 * torch.randn_like(p))
        with monkeypatch.context() as m:
            if fused:
                m.setattr(LlamaForCausalLM, "forward", fused_forward)
            data = batch()
            out = model.train()(**data)
            assert (out.logits is None) == fused
            reg, metrics = objective.compute(model, data)
            (out.loss + reg).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return out.loss.detach(), reg.detach(), metrics["balora/consistency"], grads

    plain, fused = step(False), step(True)
    assert plain[2] > 1e-4
    for a, b in zip(plain, fused):
        assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-5, atol=1e-6)
