"""The axolotl plugin: YAML keys and their validation, refusals, the loud failure modes, the model hooks under
axolotl's own loader, the trainer against axolotl's, and ``axolotl train`` end to end (integrations/axolotl)."""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.axolotl
pytest.importorskip("axolotl")

from axolotl.cli.config import gpu_capabilities  # noqa: E402
from axolotl.core.trainers.base import AxolotlTrainer  # noqa: E402
from axolotl.integrations.base import PluginManager  # noqa: E402
from axolotl.utils.config import prepare_plugins, validate_config  # noqa: E402
from axolotl.utils.dict import DictDefault  # noqa: E402
from conftest import CONSTANT, batch, lora, tiny_llama  # noqa: E402

from balora_plugins.axolotl.args import (  # noqa: E402
    PLUGIN,
    BALoRATrainingArgsMixin,
    balora_config_from_cfg,
    balora_keys,
)
from balora_plugins.config import BALoRAConfig  # noqa: E402
from balora_plugins.core.reference import REF_ADAPTER, reference_mode  # noqa: E402

# What `axolotl train` does first: register the listed plugins, before axolotl builds AxolotlTrainingArguments
# (with every registered plugin's training-args mixin) on first import of axolotl.core.training_args.
prepare_plugins(DictDefault(plugins=[PLUGIN]))

ROOT = Path(__file__).resolve().parents[1]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
BASE = {
    "base_model": "./tiny-llama",
    "plugins": [PLUGIN],
    "datasets": [{"path": "./data/train.jsonl", "ds_type": "json", "type": "alpaca"}],
    "sequence_len": 64,
    "adapter": "lora",
    "peft_init_lora_weights": "pissa",
    "lora_r": 4,
    "lora_alpha": 4,
    "lora_target_modules": ["q_proj", "v_proj"],
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "num_epochs": 1,
    "learning_rate": 0.001,
    "output_dir": "./out",
}


def validate(**overrides):
    """What ``axolotl train`` does to a YAML before training: register plugins, then validate (with this
    machine's capabilities, as ``load_cfg`` does; they switch on axolotl's kernel auto-enable)."""
    cfg = DictDefault({**copy.deepcopy(BASE), **overrides})
    prepare_plugins(cfg)
    return validate_config(cfg, *gpu_capabilities())


def load_yaml(name: str) -> dict:
    with open(ROOT / "example_configs" / name, encoding="utf-8") as f:
        return yaml.safe_load(f)


# ---------------------------------------------------------------------------------------------- keys
def test_every_config_field_is_a_yaml_key_with_its_help_and_readme_row():
    nlu_only = {"balora_reference_cache", "balora_reference_head"}  # axolotl trains causal LMs
    expected = {f"balora_{f.name}" for f in BALoRAConfig.__dataclass_fields__.values()} - {
        "balora_task",
        *nlu_only,
    }
    assert set(balora_keys()) == expected
    from balora_plugins.axolotl.args import BALoRAArgs

    for key, f in balora_keys().items():
        assert BALoRAArgs.model_fields[key].description == f.metadata["help"]
    readme = (ROOT / "balora_plugins" / "axolotl" / "README.md").read_text(encoding="utf-8")
    preset = BALoRAConfig.from_preset("iclr2026-nlg")
    rows = dict(re.findall(r"^\| `(balora_\w+)` \| `([^`]*)` \|", readme, flags=re.M))
    assert rows.pop("balora_preset") == "iclr2026-nlg"
    assert rows == {k: str(getattr(preset, f.name)) for k, f in balora_keys().items()}


def test_nlu_only_settings_are_neither_keys_nor_training_arguments():
    """balora_reference_cache / balora_reference_head can only be false / initial on a causal LM: axolotl offers
    neither as a YAML key nor as a field of its TrainingArguments, and refuses them naming why."""
    import dataclasses

    from balora_plugins.axolotl.args import BALoRAArgs

    mixin = {f.name for f in dataclasses.fields(BALoRATrainingArgsMixin)}
    for key in ("balora_reference_cache", "balora_reference_head"):
        assert key not in BALoRAArgs.model_fields and key not in mixin
        with pytest.raises(
            ValueError, match=rf"{key} applies to task nlu only, and axolotl trains causal LMs"
        ):
            validate(**{key: False})
    assert "balora_reference" in BALoRAArgs.model_fields and "balora_reference" in mixin


def test_keys_map_onto_balora_config_and_unset_keys_take_the_preset():
    cfg = validate(
        balora_preset="v5-nlg",
        balora_lambda_svd=0.25,
        balora_svd_top_k=3,
        balora_temperature="1e-1",
        balora_consistency_schedule="cosine",
        balora_reference="adapter_snapshot",
        balora_chunk_size=32,
    )
    got = balora_config_from_cfg(cfg)
    want = BALoRAConfig.from_preset(
        "v5-nlg",
        lambda_svd=0.25,
        svd_top_k=3,
        temperature=0.1,
        consistency_schedule="cosine",
        reference="adapter_snapshot",
        chunk_size=32,
    )
    assert got == want
    assert balora_config_from_cfg(validate()) == BALoRAConfig.from_preset("iclr2026-nlg")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("balora_lambda_svd", "abc", "valid number"),
        ("balora_lambda_svd", True, "boolean"),
        ("balora_lambda_svd", -0.1, "negative"),
        ("balora_svd_top_k", 2.5, "integer"),
        ("balora_svd_top_k", 0, ">= 1"),
        ("balora_formulation", "v7", "iclr2026"),
        ("balora_consistency_schedule", "linear", "cosine"),
        ("balora_reference", "model", "adapter_snapshot"),
        ("balora_preset", "iclr2026-nlu", "iclr2026-nlg"),
        ("balora_temperature", 0, "must be > 0"),
        ("balora_warmup_start", 0.99, "warmup_start"),
        ("balora_shift_labels", "maybe", "bool"),
    ],
)
def test_a_wrong_type_or_value_fails_axolotl_validation_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=message) as info:
        validate(**{key: value})
    assert key in str(info.value)


def test_a_misspelled_key_fails_with_a_suggestion():
    with pytest.raises(ValueError, match=r"'balora_lamda_svd' \(did you mean 'balora_lambda_svd'\?\)"):
        validate(balora_lamda_svd=0.01)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rl": "dpo"}, "rl='dpo': the BA-LoRA plugin supports supervised fine-tuning only"),
        ({"rl": "kto"}, "rl='kto': the BA-LoRA plugin supports supervised fine-tuning only"),
        ({"rl": "grpo"}, "rl='grpo': the BA-LoRA plugin supports supervised fine-tuning only"),
        ({"reward_model": True}, "reward_model=True: the BA-LoRA plugin supports supervised"),
        ({"process_reward_model": True}, "process_reward_model=True: the BA-LoRA plugin"),
        (
            {"adapter": "qlora", "load_in_4bit": True, "peft_use_dora": True},
            r"peft_use_dora=True with peft_init_lora_weights='pissa' and load_in_4bit=True: DoRA's magnitude",
        ),
        (
            {"adapter": "qlora", "load_in_4bit": True, "peft_init_lora_weights": "olora"},
            r"'olora' with load_in_4bit=True: on a quantised base BA-LoRA supports only PiSSA",
        ),
        (
            {"adapter": "lora", "load_in_8bit": True, "peft_init_lora_weights": "pissa_niter_4"},
            r"'pissa_niter_4' with load_in_8bit=True: QPiSSA is supported on 4-bit bitsandbytes bases only",
        ),
        (
            {"adapter": "qlora", "load_in_4bit": True, "deepspeed": {"zero_optimization": {"stage": 3}}},
            r"'pissa' with load_in_4bit=True under DeepSpeed ZeRO-3 .* not supported",
        ),
        ({"adapter": None, "peft_init_lora_weights": None}, "adapter=None: BA-LoRA needs `adapter: lora`"),
        ({"adapter": "llama-adapter"}, "adapter=.llama-adapter.: BA-LoRA needs"),
        ({"kd_trainer": True}, r"kd_trainer=True: axolotl's knowledge-distillation plugin .* separate runs"),
        ({"nf4_backend": "torchao"}, r"nf4_backend='torchao' \(axolotl 0.21\+\): .* bitsandbytes"),
        ({"relora": True, "jagged_restart_steps": 10}, "relora=True: ReLoRA merges"),
        ({"lora_mlp_kernel": True}, r"lora_mlp_kernel=True: axolotl's fused .* `lora_mlp_kernel: false`"),
        ({"lora_embedding_kernel": True}, r"lora_embedding_kernel=True: .* `lora_embedding_kernel: false`"),
    ],
)
def test_settings_balora_cannot_train_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(**overrides)


def test_each_rule_is_its_own_validator_and_qlora_with_plain_init_passes():
    from balora_plugins.axolotl import args

    rules = [
        args.unknown_keys,
        args.supervised_only,
        args.no_kd_trainer,
        args.lora_adapter,
        args.qpissa_on_4bit_only,
        args.no_relora,
        args.verified_kernels_only,
        args.supported_release,
    ]
    validators = args.BALoRAArgs.__pydantic_decorators__.model_validators
    assert {f"_balora_{r.__name__}" for r in rules} <= set(validators)
    # each rule refuses its own setting and nothing else
    bad = [{"balora_x": 1}, {"rl": "dpo"}, {"kd_trainer": True}, {"adapter": "ia3"}, {"load_in_8bit": True}]
    bad += [{"relora": True}, {"lora_mlp_kernel": True}, {"nf4_backend": "torchao"}]
    base = {"adapter": "lora", "peft_init_lora_weights": "pissa"}
    for i, rule in enumerate(rules):
        for j, setting in enumerate(bad):
            if i == j:
                with pytest.raises(ValueError):
                    rule({**base, **setting})
            else:
                rule({**base, **setting})
    qlora = validate(adapter="qlora", load_in_4bit=True, peft_init_lora_weights=None)
    assert qlora.adapter == "qlora" and balora_config_from_cfg(qlora).reference == "auto"
    qpissa = validate(adapter="qlora", load_in_4bit=True, peft_init_lora_weights="pissa_niter_16")
    assert qpissa.peft_init_lora_weights == "pissa_niter_16"  # QPiSSA (docs/qlora.md)


def test_release_check_names_the_release():
    from balora_plugins.axolotl import compat

    with pytest.raises(
        ValueError, match=r"axolotl 0.18.2: the BA-LoRA plugin supports axolotl 0.19 and newer"
    ):
        compat.check_release((0, 18), "0.18.2")
    assert "not a release the BA-LoRA plugin is tested with" in compat.check_release((0, 20), "0.20.1")
    assert compat.check_release() is None and compat.RELEASE in compat.TESTED


def test_unset_lora_kernels_are_switched_off_where_axolotl_would_switch_them_on():
    cfg = validate()
    assert [cfg[k] for k in KERNELS] == [False] * 4
    opted_in = validate(lora_qkv_kernel=True, lora_o_kernel=True)  # verified below: allowed
    assert [opted_in[k] for k in KERNELS] == [False, True, True, False]
    plain = DictDefault({k: v for k, v in copy.deepcopy(BASE).items() if k != "plugins"})
    without_us = validate_config(plain, *gpu_capabilities())
    assert [without_us[k] for k in KERNELS] == [True] * 4  # axolotl's auto-enable


def test_the_plugin_ignores_configs_that_do_not_list_it():
    validate()  # BA-LoRA registered in this process, as after an earlier config
    # another config with a plugin list: axolotl merges every registered plugin's args model into its schema
    grokfast = "axolotl.integrations.grokfast.GrokfastPlugin"  # ships with axolotl 0.19 and 0.21
    other = DictDefault({**copy.deepcopy(BASE), "plugins": [grokfast], "adapter": None})
    del other["peft_init_lora_weights"]
    prepare_plugins(other)
    # full fine-tuning is not refused and no kernel key is touched: BA-LoRA is not listed
    assert validate_config(DictDefault(copy.deepcopy(other)), *gpu_capabilities()).adapter is None
    assert all(other.get(k) is None for k in KERNELS)
    plugin = PluginManager.get_instance().plugins[PLUGIN]
    assert plugin.get_trainer_cls(other) is None and plugin.get_training_args(other) is None
    assert plugin.post_lora_load(other, None) is None and plugin.post_trainer_create(other, None) is None


# ---------------------------------------------------------------------------------------------- loud failures
def test_a_broken_install_stops_axolotl_instead_of_training_without_balora(monkeypatch):
    manager = PluginManager.get_instance()
    manager.register("balora_plugins_not_installed.Plugin")  # axolotl's own behaviour: log and carry on
    assert "balora_plugins_not_installed.Plugin" not in manager.plugins
    monkeypatch.delitem(sys.modules, "balora_plugins.axolotl")
    monkeypatch.setitem(sys.modules, "balora_plugins.engines", None)  # -> ImportError on import
    monkeypatch.delitem(manager.plugins, PLUGIN)
    # as `axolotl train` registers the listed plugins (0.19: logs an ImportError; 0.21: required=True)
    with pytest.raises(RuntimeError, match="trains WITHOUT it"):
        prepare_plugins(DictDefault(copy.deepcopy(BASE)))


def test_preflight_refuses_balora_keys_without_the_plugin_line():
    from balora_plugins.axolotl.check import check_config

    cfg = {k: v for k, v in copy.deepcopy(BASE).items() if k != "plugins"}
    for plugins in ([], ["balora_plugin.axolotl.BALoRAPlugin"]):
        with pytest.raises(ValueError, match=r"\['balora_lambda_svd'\] are set but .* WITHOUT BA-LoRA"):
            check_config({**cfg, "plugins": plugins, "balora_lambda_svd": 0.01})
    assert check_config({**cfg, "plugins": [PLUGIN], "balora_lambda_svd": 0.01}).lambda_svd == 0.01


# ---------------------------------------------------------------------------------------------- example YAMLs
@pytest.mark.parametrize(
    "name, base",
    [
        ("llama2-7b", "meta-llama/Llama-2-7b-hf"),
        ("mistral-7b", "mistralai/Mistral-7B-v0.1"),
        ("gemma-7b", "google/gemma-7b"),
    ],
)
def test_paper_recipes_pass_axolotl_validation(name, base):
    from balora_plugins.axolotl.check import check_config

    raw = load_yaml(f"{name}-metamath-balora.yml")
    assert check_config(raw) == BALoRAConfig.from_preset("iclr2026-nlg")
    cfg = validate_config(DictDefault(copy.deepcopy(raw)))
    assert cfg.base_model == base and cfg.adapter == "lora"
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (128, 128, 0.0)
    assert set(cfg.lora_target_modules) == set(PROJECTIONS)
    assert cfg.peft_init_lora_weights in ("pissa", "pissa_niter_16")
    schedule = (cfg.learning_rate, cfg.lr_scheduler, cfg.warmup_ratio, cfg.num_epochs)
    assert schedule == (2e-5, "cosine", 0.03, 1)
    assert cfg.micro_batch_size * cfg.gradient_accumulation_steps == 32 and cfg.bf16 is True
    assert [cfg[k] for k in KERNELS] == [False] * 4


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("smollm2-135m-balora.yml", {}),
        (
            "tiny-cpu-balora.yml",
            dict(
                lambda_consistency=0.5,
                lambda_diversity=0.05,
                lambda_svd=0.05,
                regularizer_schedule="constant",
                svd_top_k=4,
                chunk_size=64,
            ),
        ),
    ],
)
def test_runnable_example_configs_pass_axolotl_validation(name, overrides):
    from balora_plugins.axolotl.check import check_config

    assert check_config(load_yaml(name)) == BALoRAConfig.from_preset("iclr2026-nlg", **overrides)


# ---------------------------------------------------------------------------------------------- hooks and trainer
def _plugin_and_pretrained():
    """The registered plugin, a tiny pre-trained model, token ids (2, 10) and its logits on them."""
    pretrained = tiny_llama(seed=3)
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pretrained(input_ids=ids).logits
    return PluginManager.get_instance().plugins[PLUGIN], pretrained, ids, want


def test_post_lora_load_snapshot_survives_axolotl_and_reproduces_the_pretrained_model():
    cfg = validate()
    plugin, pretrained, ids, want = _plugin_and_pretrained()
    model = lora(copy.deepcopy(pretrained), init="pissa", targets=("q_proj", "v_proj", "down_proj"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    plugin.post_lora_load(cfg, model)
    plugin.post_model_load(cfg, model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert any(f".{REF_ADAPTER}." in n for n, _ in model.named_parameters())
    with torch.no_grad():
        residual = model(input_ids=ids).logits  # step 0: PiSSA's W_res + s·B0A0 = W
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        with reference_mode(model, "adapter_snapshot"):
            ref = model(input_ids=ids).logits
    assert (ref - want).abs().max() < 1e-5 and (residual - want).abs().max() < 1e-5
    assert (off - want).abs().max() > 1e-3  # the residual base alone is not the reference
    for _, p in model.named_parameters():
        p.requires_grad_(False)
    with pytest.raises(RuntimeError, match="'default' must be trainable"):
        plugin.post_model_load(cfg, model)


def test_post_lora_load_takes_a_preinitialised_pissa_pair_from_lora_model_dir(tmp_path):
    """PEFT's PiSSA recipe: the residual model as `base_model`, the adapter saved with init_lora_weights=True as
    `lora_model_dir`. Its config looks like plain LoRA; the pair is recognised and gets the snapshot reference.
    An adapter whose config names PiSSA is refused (PEFT re-runs the SVD on load)."""
    from peft import PeftModel

    cfg = validate(lora_model_dir=str(tmp_path / "pissa_init"), peft_init_lora_weights=None)
    plugin, pretrained, ids, want = _plugin_and_pretrained()
    pair = lora(copy.deepcopy(pretrained), init="pissa_niter_4", targets=("q_proj", "v_proj", "down_proj"))
    pair.peft_config["default"].init_lora_weights = True
    pair.save_pretrained(str(tmp_path / "pissa_init"))
    model = PeftModel.from_pretrained(pair.unload(), str(tmp_path / "pissa_init"), is_trainable=True)
    plugin.post_lora_load(cfg, model)
    plugin.post_model_load(cfg, model)
    assert REF_ADAPTER in model.peft_config
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default." in name:
                p.add_(0.05 * torch.randn_like(p))
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        with reference_mode(model, "adapter_snapshot"):
            ref = model(input_ids=ids).logits
    assert (ref - want).abs().max() < 1e-5 and (off - want).abs().max() > 1e-3

    named = lora(copy.deepcopy(pretrained), init="pissa", targets=("q_proj", "v_proj"))
    with pytest.raises(ValueError, match=r"lora_model_dir=.*init_lora_weights='pissa'.*ran that init again"):
        plugin.post_lora_load(cfg, named)


def test_regularizers_are_exact_under_axolotls_qkv_and_o_lora_kernels(tmp_path, monkeypatch):
    """The fused qkv/o kernels read PEFT's adapter state per call, so the reference switch reaches them:
    loss, regularizer, terms and gradients equal PEFT's forward. (The MLP kernel is Triton: GPU only.)"""
    from axolotl.monkeypatch.lora_kernels import apply_lora_kernel_patches, patch_self_attn_lora
    from transformers.models.llama.modeling_llama import LlamaAttention

    from balora_plugins.core.objective import BALoRAObjective

    monkeypatch.setattr(LlamaAttention, "forward", LlamaAttention.forward)  # axolotl patches the class
    tiny_llama(seed=2).save_pretrained(tmp_path)
    kernels = DictDefault(
        base_model=str(tmp_path), lora_qkv_kernel=True, lora_o_kernel=True, lora_mlp_kernel=False
    )
    config = BALoRAConfig(
        lambda_consistency=1.0, lambda_diversity=0.1, lambda_svd=0.1, svd_top_k=2, **CONSTANT
    )

    def step(fused: bool):
        torch.manual_seed(0)
        model = lora(tiny_llama(seed=2), init="pissa", targets=PROJECTIONS[:4], task_type="CAUSAL_LM")
        objective = BALoRAObjective(config).prepare(model)
        with torch.no_grad():  # move the trained adapter away from the snapshot
            for name, p in model.named_parameters():
                if ".default." in name:
                    p.add_(0.05 * torch.randn_like(p))
        if fused:
            patch_self_attn_lora(kernels)
            apply_lora_kernel_patches(model, kernels)
            assert model.base_model.model.model.layers[0].self_attn.apply_qkv.__name__ == "apply_lora_qkv"
        data = batch()
        out = model.train()(**data)
        reg, metrics = objective.compute(model, data)
        (out.loss + reg).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return out.loss.detach(), reg.detach(), metrics["balora/consistency"], grads

    plain, fused = step(False), step(True)
    assert plain[2] > 1e-4  # the reference differs from the trained model
    for a, b in zip(plain, fused):
        assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-5, atol=1e-6)


class CustomTrainer(AxolotlTrainer):
    """A YAML `trainer_cls` (an AxolotlTrainer subclass) gets BA-LoRA in front of it."""


def _trainer(cls, model, tmp_path, args_cls=None, **balora):
    """``cls`` on 8 rows, 2 steps of 2 x 2; ``balora`` = balora_* TrainingArguments values, as axolotl's builder
    passes them from the plugin's ``get_training_args``."""
    from axolotl.core.training_args import AxolotlTrainingArguments
    from datasets import Dataset
    from transformers import default_data_collator

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        ids = torch.randint(3, 90, (12,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * 12, "labels": [-100] * 4 + ids[4:]})
    args = (args_cls or AxolotlTrainingArguments)(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        dataloader_num_workers=0,
        **balora,
    )
    collate = default_data_collator
    return cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=collate,
        eval_data_collator=collate,
    )


def test_settings_reach_the_trainer_through_axolotls_training_arguments():
    from axolotl.core.training_args import AxolotlTrainingArguments

    # axolotl mixed the plugin's dataclass into its TrainingArguments (the module-level prepare_plugins above)
    assert issubclass(AxolotlTrainingArguments, BALoRATrainingArgsMixin)
    plugin = PluginManager.get_instance().plugins[PLUGIN]
    assert plugin.get_training_args_mixin() == "balora_plugins.axolotl.args.BALoRATrainingArgsMixin"
    cfg = validate(balora_preset="v5-nlg", balora_lambda_svd=0.25, balora_temperature="1e-1")
    kwargs = PluginManager.get_instance().get_training_args(cfg)  # what axolotl's builder adds to its kwargs
    assert set(kwargs) == {"balora_preset", *balora_keys()}
    args = AxolotlTrainingArguments(output_dir="unused", **kwargs)
    want = BALoRAConfig.from_preset("v5-nlg", lambda_svd=0.25, temperature=0.1)
    assert balora_config_from_cfg(vars(args)) == want == balora_config_from_cfg(cfg)


def test_trainer_subclasses_axolotls_and_reports_through_its_metric_store(tmp_path):
    from balora_plugins.axolotl.trainer import AxolotlBALoRATrainer, trainer_class

    assert trainer_class(DictDefault({})) is AxolotlBALoRATrainer
    custom = trainer_class(DictDefault({"trainer_cls": f"{__name__}.CustomTrainer"}))
    assert custom.__mro__[1] is AxolotlBALoRATrainer and custom.__mro__[3] is CustomTrainer
    with pytest.raises(ValueError, match="not a subclass of axolotl's AxolotlTrainer"):
        trainer_class(DictDefault({"trainer_cls": "transformers.Trainer"}))

    base = tiny_llama(seed=1)
    host = _trainer(AxolotlTrainer, lora(copy.deepcopy(base), init="pissa"), tmp_path / "host")
    off = dict(balora_lambda_consistency=0.0, balora_lambda_diversity=0.0, balora_lambda_svd=0.0)
    zero = _trainer(custom, lora(copy.deepcopy(base), init="pissa"), tmp_path / "z", **off)
    on = dict(balora_lambda_consistency=0.5, balora_lambda_diversity=0.1, balora_lambda_svd=0.1)
    on.update(balora_consistency_schedule="constant", balora_regularizer_schedule="constant")
    reg = _trainer(
        AxolotlBALoRATrainer,
        lora(copy.deepcopy(base), init="pissa"),
        tmp_path / "r",
        **on,
        balora_svd_top_k=2,
    )
    want = {k.removeprefix("balora_"): v for k, v in on.items()}
    assert reg.balora.config == BALoRAConfig.from_preset("iclr2026-nlg", **want, svd_top_k=2)
    for t in (host, zero, reg):
        t.train()
    # λ = 0: the same run as axolotl's own trainer, step for step.
    h, z = (t.state.log_history[:2] for t in (host, zero))
    assert [s["loss"] for s in h] == pytest.approx([s["loss"] for s in z], rel=1e-5)
    # λ > 0: the logged loss of step 1 (same weights and batch as the host) = host CE + the logged regularizer,
    # and every term reached the logs through axolotl's store (mean over the step's two micro-batches).
    first = reg.state.log_history[0]
    assert first["loss"] == pytest.approx(h[0]["loss"] + first["balora/loss"], abs=2e-4)
    for key in ("balora/consistency", "balora/diversity", "balora/svd", "balora/lambda_svd"):
        assert key in first
    assert first["balora/lambda_svd"] == 0.1
    evaluation = reg.evaluate(eval_dataset=reg.train_dataset)  # eval metrics: prefixed, same store
    assert evaluation["eval_balora/consistency"] > 0 and "eval_balora/svd" in evaluation
    # one store: axolotl's (emptied by its log); the mixin's own store for hosts without one stays empty
    assert not any(reg.balora_state.metrics.values()) and not any(
        reg._stored_metrics[m] for m in ("train", "eval")
    )


def test_task_loss_is_axolotls_loss_through_its_metric_store(tmp_path):
    """balora/task_loss: axolotl's own logged loss when every λ = 0 (2 accumulation steps), loss − Σ λ·term when
    λ > 0; eval_balora/task_loss is eval_loss."""
    from balora_plugins.axolotl.trainer import AxolotlBALoRATrainer

    base = tiny_llama(seed=1)
    host = _trainer(AxolotlTrainer, lora(copy.deepcopy(base), init="pissa"), tmp_path / "host")
    off = dict(balora_lambda_consistency=0.0, balora_lambda_diversity=0.0, balora_lambda_svd=0.0)
    zero = _trainer(AxolotlBALoRATrainer, lora(copy.deepcopy(base), init="pissa"), tmp_path / "z", **off)
    on = dict(balora_lambda_consistency=0.5, balora_lambda_diversity=0.1, balora_lambda_svd=0.1)
    on.update(balora_consistency_schedule="constant", balora_regularizer_schedule="constant")
    reg = _trainer(AxolotlBALoRATrainer, lora(copy.deepcopy(base), init="pissa"), tmp_path / "r", **on)
    for t in (host, zero, reg):
        t.train()
    logs = {id(t): [h for h in t.state.log_history if "loss" in h] for t in (host, zero, reg)}
    want = [h["loss"] for h in logs[id(host)]]
    assert len(want) == 2
    # (axolotl rounds its stored metrics to AXOLOTL_METRIC_NDIGITS = 5 decimals)
    assert [h["balora/task_loss"] for h in logs[id(zero)]] == pytest.approx(want, rel=1e-5, abs=1e-5)
    first = logs[id(reg)][0]  # step 1: same weights and batch as the host
    assert first["balora/task_loss"] == pytest.approx(want[0], rel=1e-5, abs=1e-5)
    assert first["loss"] - first["balora/task_loss"] == pytest.approx(first["balora/loss"], abs=2e-4)
    evaluation = reg.evaluate(eval_dataset=reg.train_dataset)
    assert evaluation["eval_balora/task_loss"] == pytest.approx(evaluation["eval_loss"], rel=1e-5, abs=1e-5)


def test_axolotl_train_refuses_an_earlier_run_before_loading_data_unless_resumed_or_overwritten(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "balora_config.json").write_text("{}")
    manager = PluginManager.get_instance()
    cfg = validate(output_dir=str(out))  # merge-lora / inference validate the same config: that passes
    with pytest.raises(FileExistsError) as err:
        manager.load_datasets(
            cfg, preprocess=False
        )  # what `axolotl train` calls first, before data and model
    message = str(err.value)
    assert "already holds BA-LoRA checkpoints of an earlier run (checkpoint-3)" in message
    assert f"`resume_from_checkpoint: {out / 'checkpoint-3'}`" in message
    assert (
        "`auto_resume_from_checkpoints: true`" in message and "`balora_overwrite_output_dir: true`" in message
    )
    for ok in (
        dict(resume_from_checkpoint=str(out / "checkpoint-3")),
        dict(auto_resume_from_checkpoints=True),
        dict(balora_overwrite_output_dir=True),
    ):
        assert manager.load_datasets(validate(output_dir=str(out), **ok), preprocess=False) is None
    cfg = validate(output_dir=str(out), balora_overwrite_output_dir=True)
    assert balora_config_from_cfg(cfg).overwrite_output_dir is True
    assert manager.load_datasets(validate(output_dir=str(tmp_path / "fresh")), preprocess=False) is None


def test_trainer_refuses_arguments_without_balora_settings_and_a_foreign_trainer(tmp_path, monkeypatch):
    import dataclasses

    from axolotl.core.training_args_base import AxolotlTrainingMixins
    from transformers import TrainingArguments

    from balora_plugins.axolotl.trainer import AxolotlBALoRATrainer

    # axolotl's arguments as built in a process that imported axolotl's trainer code before registering the plugin
    bare = dataclasses.make_dataclass("Bare", [], bases=(AxolotlTrainingMixins, TrainingArguments))
    with pytest.raises(
        RuntimeError, match="needs its BA-LoRA settings on its TrainingArguments.*'balora_preset'"
    ):
        _trainer(AxolotlBALoRATrainer, lora(tiny_llama(), init="pissa"), tmp_path, args_cls=bare)
    with pytest.raises(
        TypeError, match="takes no balora_config=.*balora_\\* fields of its TrainingArguments"
    ):
        AxolotlBALoRATrainer(model=lora(tiny_llama(), init="pissa"), balora_config="v5-nlg")
    plugin = PluginManager.get_instance().plugins[PLUGIN]
    cfg = validate()
    host = _trainer(AxolotlTrainer, lora(tiny_llama(), init="pissa"), tmp_path)  # another plugin's trainer
    with pytest.raises(RuntimeError, match="axolotl built a AxolotlTrainer, not the plugin's trainer"):
        plugin.post_trainer_create(cfg, host)
    from balora_plugins.axolotl import compat

    monkeypatch.setattr(compat, "training_args_accept", lambda names: False)
    with pytest.raises(RuntimeError, match="was built before the plugin was registered"):
        plugin.get_training_args(cfg)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_axolotl_train_end_to_end_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "run_tiny", ROOT / "integrations" / "axolotl" / "run_tiny.py"
    )
    run_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_tiny)
    result = run_tiny.main(["--workdir", str(tmp_path)])
    assert result["steps"] == 4
    # output_dir on the untouched base with plain PEFT, and axolotl merge-lora's merged model, are the trained model
    assert result["served_max_abs_err"] < 1e-4 and result["merged_max_abs_err"] < 1e-4
    assert {"axolotl", "ba-lora", "peft"} <= set(result["card_tags"])
    lambdas = [
        float(s["balora/lambda_consistency"])
        for s in run_tiny.logged_metrics((tmp_path / "axolotl.log").read_text())
    ]
    # the cosine schedule of λ1, read off axolotl's logs
    cfg = balora_config_from_cfg(load_yaml("tiny-cpu-balora.yml"))
    assert lambdas == pytest.approx([cfg.lambdas_at(i / 4)["consistency"] for i in range(4)], rel=1e-3)
