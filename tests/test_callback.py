"""`BALoRACallback` on the plain transformers `Trainer`: tiny models, a few steps each, numbers checked against the
host Trainer and against the reference maths of `balora_plugins.functional` on full logits."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import CONSTANT, VOCAB, lora, tiny_bert_classifier, tiny_llama
from transformers import Trainer, TrainerCallback, TrainingArguments

from balora_plugins import BALoRAConfig
from balora_plugins import functional as Fn
from balora_plugins.callback import BALoRACallback
from balora_plugins.trainer_mixin import BALoRATrainerMixin

NUM_LABELS = 4
BERT_TARGETS = ("query", "key", "value", "dense")
OFF = {"lambda_consistency": 0.0, "lambda_diversity": 0.0, "lambda_svd": 0.0}
NLG = {"task": "nlg", "lambda_consistency": 1.0, "lambda_diversity": 0.2, "lambda_svd": 0.2, **CONSTANT}
NLU = {"task": "nlu", "lambda_consistency": 1.0, "lambda_diversity": 0.2, "lambda_svd": 0.2, "svd_top_k": 2}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------- fixtures
def nlg_model(seed: int = 0):
    return lora(tiny_llama(seed), init="pissa")


def nlu_model(seed: int = 0, dropout: bool = True):
    base = tiny_bert_classifier(seed, num_labels=NUM_LABELS)
    if not dropout:
        for m in base.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    return lora(base, init="pissa", targets=BERT_TARGETS, task_type="SEQ_CLS")


def model_for(task: str, **kw):
    return nlg_model(**kw) if task == "nlg" else nlu_model(**kw)


def tensors(task: str, n: int = 8, t: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, t), generator=g)
    if task == "nlg":
        labels = ids.clone()
        labels[:, :3] = -100  # a prompt of 3 tokens
    else:
        labels = torch.randint(0, NUM_LABELS, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class Rows(torch.utils.data.Dataset):
    def __init__(self, data: dict[str, torch.Tensor]):
        self.data = data

    def __len__(self) -> int:
        return len(self.data["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.data.items()}


def targs(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return TrainingArguments(**{**base, **kw})


def adapter(model, name: str = "default") -> dict[str, torch.Tensor]:
    return {
        k.replace(f".{name}.", "."): p.detach().clone()
        for k, p in model.named_parameters()
        if f".{name}." in k
    }


def assert_same_adapter(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def train(task, tmp_path, config=None, seed=0, callbacks=(), data=None, model=None, **kw):
    model = model if model is not None else model_for(task, seed=seed)
    cbs = list(callbacks) + ([BALoRACallback(config)] if config is not None else [])
    trainer = Trainer(
        model=model, args=targs(tmp_path, **kw), train_dataset=Rows(data or tensors(task)), callbacks=cbs
    )
    trainer.train()
    return trainer


def has_capture_hook(model) -> bool:
    return any(len(m._forward_hooks) for m in model.modules())


# ---------------------------------------------------------------------------------------------- λ = 0 is the host
def callback_of(trainer) -> BALoRACallback:
    (cb,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, BALoRACallback)]
    return cb


@pytest.mark.parametrize("task", ["nlg", "nlu"])
def test_lambda_zero_reproduces_plain_trainer_and_detach_restores_class(task, tmp_path):
    """λ = 0: same losses and same adapter as the plain Trainer, dropout included (NLU). The mixin stays in after
    train() (save_model, evaluate); detach() gives the trainer its class back and removes the hook."""
    host = train(task, tmp_path / "host", max_steps=3)
    ours = train(task, tmp_path / "ours", config=BALoRAConfig(task=task, **OFF), max_steps=3)
    assert losses(ours) == pytest.approx(losses(host), rel=0, abs=1e-6)
    assert_same_adapter(adapter(ours.model), adapter(host.model), atol=1e-6)
    assert "balora/lambda_consistency" in ours.state.log_history[0]
    assert isinstance(ours, BALoRATrainerMixin) and ours.balora.captured_hidden is None
    callback_of(ours).detach()
    assert type(ours) is Trainer and not hasattr(ours, "balora")
    assert not has_capture_hook(ours.model)


def test_trainer_save_model_after_train_writes_the_balora_artefacts(tmp_path):
    """The habitual `trainer.save_model()` after `train()` writes what the callback's own save_model writes."""
    trainer = train("nlg", tmp_path / "run", BALoRAConfig(**NLG), max_steps=2)
    trainer.save_model(str(tmp_path / "trainer"))
    callback_of(trainer).save_model(str(tmp_path / "callback"))
    files = {}
    for name in ("trainer", "callback"):
        root = tmp_path / name
        files[name] = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert files["trainer"] == files["callback"]
    for f in (
        "balora_config.json",
        "adapter_model.safetensors",  # the servable plain LoRA at the root
        "balora_resume/adapter_model.safetensors",  # the trainable PiSSA form ...
        "balora_resume/balora_ref/adapter_config.json",  # ... with its step-0 adapter
    ):
        assert f in files["trainer"], f
    assert BALoRAConfig.from_pretrained(tmp_path / "trainer") == BALoRAConfig(**NLG)
    after = trainer.evaluate(Rows(tensors("nlg", n=4)))  # still BA-LoRA: the terms are reported
    assert "eval_balora/consistency" in after


# ---------------------------------------------------------------------------------------------- the loss itself
def _reference_maths(task, config, logits, ref_logits, labels) -> torch.Tensor:
    """λ1·L_CR + λ2·L_DR + λ3·L_SVD on full logits (docs/method.md §3.1), written out without the core."""
    if task == "nlg":
        z, zr = Fn.select_positions(logits, labels), Fn.select_positions(ref_logits, labels)
        div = Fn.diversity_loss(z, kind="entropy", top_k=20)
        svd = Fn.svd_loss(z, k=config.svd_top_k, norm="frobenius", eps=config.eps)
    else:
        z, zr = logits, ref_logits
        div = Fn.diversity_loss(z, kind="decorrelation")
        svd = Fn.svd_loss(z, k=config.svd_top_k, norm="nuclear", eps=config.eps)
    cr = Fn.consistency_loss(z, zr, kind="kl", temperature=2.0)
    return config.lambda_consistency * cr + config.lambda_diversity * div + config.lambda_svd * svd


def _user_loss(outputs, labels, num_items_in_batch=None):
    """A compute_loss_func as the Trainer documents it: summed CE over the items of the optimizer step."""
    logits = outputs["logits"]
    if logits.dim() == 3:  # causal LM: predict the next token
        logits, labels = logits[:, :-1], labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum")
    return ce / num_items_in_batch


@pytest.mark.parametrize("host", ["plain", "label_smoothing", "compute_loss_func"])
@pytest.mark.parametrize("task", ["nlg", "nlu"])
def test_loss_is_host_loss_plus_regularizer(task, host, tmp_path):
    """compute_loss = the host's own loss (plain, label-smoothed or compute_loss_func) + the BA-LoRA terms computed
    independently from full logits and a copy of the pre-trained model (the reference)."""
    base = tiny_llama() if task == "nlg" else tiny_bert_classifier(num_labels=NUM_LABELS)
    for m in base.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    pretrained = copy.deepcopy(base)
    model = (
        lora(base, init="pissa") if task == "nlg" else lora(base, targets=BERT_TARGETS, task_type="SEQ_CLS")
    )
    kw = {"label_smoothing_factor": 0.1} if host == "label_smoothing" else {}
    extra = {"compute_loss_func": _user_loss} if host == "compute_loss_func" else {}
    config = BALoRAConfig(**(NLG if task == "nlg" else NLU))
    cb = BALoRACallback(config)
    trainer = Trainer(model=model, args=targs(tmp_path, **kw), callbacks=[cb], **extra)
    torch.manual_seed(3)
    with torch.no_grad():  # move away from the initial adapter, so the consistency term is not 0
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.train()
    batch = tensors(task, n=6)
    n = int((batch["labels"][:, 1:] != -100).sum()) if task == "nlg" else len(batch["labels"])
    items = torch.tensor(n)

    host_loss = cb.host_class.compute_loss(trainer, model, dict(batch), num_items_in_batch=items)
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
    fwd = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**fwd).logits
        ref_logits = pretrained.eval()(**fwd).logits
    expected = host_loss + _reference_maths(task, config, logits, ref_logits, batch["labels"])
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    assert abs(float(loss.detach() - host_loss.detach())) > 1e-3  # the terms are really in the loss

    cb.detach()  # λ = 0 on the same trainer: exactly the host's loss
    BALoRACallback(BALoRAConfig(task=task, **OFF)).attach(trainer)
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch), num_items_in_batch=items), host_loss)


# ---------------------------------------------------------------------------------------------- accumulation
def test_gradient_accumulation_matches_trainer_scaling(tmp_path):
    """Token-level terms: 4 × 1 and 2 × 2 micro-batches give the same update (SGD, so any mis-scaling shows)."""
    cfg = BALoRAConfig(task="nlg", lambda_consistency=10.0, lambda_diversity=0.5, lambda_svd=0.0, **CONSTANT)
    kw = dict(optim="sgd", learning_rate=0.5, max_steps=2)
    one = train(
        "nlg", tmp_path / "a", cfg, per_device_train_batch_size=4, gradient_accumulation_steps=1, **kw
    )
    two = train(
        "nlg", tmp_path / "b", cfg, per_device_train_batch_size=2, gradient_accumulation_steps=2, **kw
    )
    off = train("nlg", tmp_path / "c", BALoRAConfig(**OFF), per_device_train_batch_size=4, **kw)
    assert_same_adapter(adapter(two.model), adapter(one.model), atol=2e-6)
    assert max_diff(adapter(one.model), adapter(off.model)) > 5e-4  # the terms move the weights (>> atol)
    step2 = [h for h in two.state.log_history if h.get("step") == 2 and "loss" in h][0]
    assert step2["balora/consistency"] > 0
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)


def test_nlu_accumulation_with_a_mean_loss_host(tmp_path):
    """NLU: BERT's loss ignores num_items_in_batch although its forward takes **kwargs, so the Trainer must be told
    (its documented model_accepts_loss_kwargs = False); then CE + consistency give the same update for 4 × 1 and
    2 × 2."""
    cfg = BALoRAConfig(task="nlu", lambda_consistency=5.0, lambda_diversity=0.0, lambda_svd=0.0)
    kw = dict(optim="sgd", learning_rate=0.5, max_steps=2)
    runs = []
    for bs, ga in ((4, 1), (2, 2)):
        model = nlu_model(dropout=False)
        args = targs(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, **kw)
        trainer = Trainer(
            model=model, args=args, train_dataset=Rows(tensors("nlu")), callbacks=[BALoRACallback(cfg)]
        )
        trainer.model_accepts_loss_kwargs = False
        trainer.train()
        assert trainer.state.log_history[1]["balora/consistency"] > 0
        runs.append(adapter(model))
    assert_same_adapter(runs[1], runs[0], atol=1e-6)


def test_the_trainer_feeds_the_schedules_its_step_and_total_steps(tmp_path):
    """5 optimizer steps under the authors' whole-step warm-up (warmup_start 0.3, ramp 0.2): their script starts
    at w = int(0.3·5) = 1 and ramps over r = max(int(0.2·5), 1) = 1 step, so λ2, λ3 get the factors 0, 0, 1, 1, 1
    (the fractional schedule would give 0.5 at step 2); the adaptive λ1 follows the logged confidence c."""
    cfg = BALoRAConfig(
        **{
            **NLG,
            "consistency_schedule": "adaptive",
            "temperature": 0.1,
            "regularizer_schedule": "warmup",
            "warmup_start": 0.3,
            "warmup_ramp": 0.2,
            "schedule_whole_steps": True,
        }
    )
    logs = [h for h in train("nlg", tmp_path, cfg, max_steps=5).state.log_history if "loss" in h]
    assert [h["balora/lambda_svd"] / NLG["lambda_svd"] for h in logs] == [0, 0, 1, 1, 1]
    assert [h["balora/lambda_diversity"] / NLG["lambda_diversity"] for h in logs] == [0, 0, 1, 1, 1]
    for h in logs:
        c = h["balora/reference_confidence"]
        assert 0.0 < c < 1.0
        lam1 = NLG["lambda_consistency"]
        assert h["balora/lambda_consistency"] == pytest.approx(0.1 * lam1 + 0.9 * lam1 * c, rel=1e-9)


# ---------------------------------------------------------------------------------------------- resume
class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_restores_reference_and_schedule(tmp_path):
    """Killed after step 2, resumed into a model whose adapter holds other weights (neither the initial nor the
    step-2 ones): the reference and the trained adapter both come from the checkpoint, the λ schedule continues,
    and the run ends where an uninterrupted one does (adapter within 1e-5)."""
    cfg = BALoRAConfig(
        task="nlg",
        lambda_consistency=2.0,
        lambda_diversity=0.2,
        lambda_svd=0.2,
        consistency_schedule="cosine",
        regularizer_schedule="constant",
    )
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=5e-2)
    initial = adapter(nlg_model())
    full = train("nlg", tmp_path / "full", cfg, **kw)

    train("nlg", tmp_path / "cut", cfg, callbacks=[StopAt(2)], **kw)
    ckpt = tmp_path / "cut" / "checkpoint-2"
    assert (ckpt / "balora_config.json").is_file() and (
        ckpt / "balora_resume" / "balora_ref" / "adapter_config.json"
    ).is_file()

    model = nlg_model()
    torch.manual_seed(5)
    with torch.no_grad():  # the weights the callback sees when it attaches are not the initial adapter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    cb = BALoRACallback(cfg)
    trainer = Trainer(
        model=model, args=targs(tmp_path / "cut", **kw), train_dataset=Rows(tensors("nlg")), callbacks=[cb]
    )
    trainer.train(resume_from_checkpoint=str(ckpt))

    assert_same_adapter(adapter(model, "balora_ref"), initial, atol=0)
    assert_same_adapter(adapter(model), adapter(full.model), atol=1e-5)
    later = {h["step"]: h for h in full.state.log_history if "loss" in h and h["step"] > 2}
    resumed = {h["step"]: h for h in trainer.state.log_history if "loss" in h and h["step"] > 2}
    assert resumed.keys() == later.keys() == {3, 4}
    for step in (3, 4):
        for key in ("loss", "balora/lambda_consistency", "balora/consistency"):
            assert resumed[step][key] == pytest.approx(later[step][key], rel=1e-4, abs=1e-7), (step, key)


# ---------------------------------------------------------------------------------------------- logging
class Recorder(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_metrics_reach_callbacks_registered_before_it(tmp_path):
    """A callback registered before BALoRACallback (as report_to backends are) sees the balora/* values."""
    rec = Recorder()
    trainer = train(
        "nlu", tmp_path, BALoRAConfig(**NLU), callbacks=[rec], max_steps=2, per_device_train_batch_size=4
    )
    train_logs = [log for log in rec.logs if "loss" in log]
    assert len(train_logs) == 2
    for seen, stored in zip(train_logs, [h for h in trainer.state.log_history if "loss" in h], strict=True):
        assert seen["balora/consistency"] == stored["balora/consistency"]
        assert {"balora/diversity", "balora/svd", "balora/loss"} <= seen.keys()
    assert train_logs[-1]["balora/consistency"] > 0


# ---------------------------------------------------------------------------------------------- attaching, errors
def test_attach_after_construction(tmp_path):
    trainer = Trainer(model=nlg_model(), args=targs(tmp_path), train_dataset=Rows(tensors("nlg")))
    cb = BALoRACallback(BALoRAConfig(**NLG)).attach(trainer)
    assert isinstance(trainer, BALoRATrainerMixin) and cb in trainer.callback_handler.callbacks
    trainer.train()
    assert "balora/consistency" in trainer.state.log_history[0]
    cb.detach()
    assert type(trainer) is Trainer


def test_detach_takes_the_state_along_and_attach_gives_it_back(tmp_path, monkeypatch):
    """The mixin's state is initialised when BA-LoRA goes in; detach takes it out of the trainer (which is its
    own class again, with none of BA-LoRA's attributes); a later attach gives the same state back, so an explicit
    ref_model is placed for the engine once, not at every attach (save_model after detach attaches again)."""
    import balora_plugins.trainer_mixin as mixin

    placed = []
    real = mixin.prepare_reference_model
    monkeypatch.setattr(mixin, "prepare_reference_model", lambda m, acc: placed.append(m) or real(m, acc))
    ref = tiny_llama()  # the pre-trained base the adapter is created on
    trainer = Trainer(model=nlg_model(), args=targs(tmp_path), train_dataset=Rows(tensors("nlg")))
    cb = BALoRACallback(BALoRAConfig(**NLG, reference="model"), ref_model=ref).attach(trainer)
    state = trainer.balora_state
    assert state.placed_ref[0] is ref and trainer.balora.ref_model is state.placed_ref[1]
    assert state.step0_dir is None and state.ref_state is None and state.hold_resume is False
    assert cb.host_class is Trainer and trainer.balora_peft_model is trainer.model
    cb.detach()
    assert type(trainer) is Trainer and cb.host_class is None
    assert not any(hasattr(trainer, a) for a in ("balora", "balora_state"))
    cb.save_model(str(tmp_path / "out"))  # attaches for the save, then detaches again
    assert os.path.isfile(tmp_path / "out" / "balora_config.json") and type(trainer) is Trainer
    cb.attach(trainer)
    assert trainer.balora_state is state and trainer.balora.ref_model is state.placed_ref[1]
    assert placed == [ref]


def test_fails_loudly_when_no_trainer_is_on_the_stack(tmp_path, monkeypatch):
    """A transformers release that fires on_init_end from elsewhere (here: another thread, so no frame of
    Trainer.__init__ is on the stack) must not leave a Trainer that trains without the terms."""
    import threading

    from transformers.trainer_callback import CallbackHandler

    fire = CallbackHandler.on_init_end

    def elsewhere(self, *args, **kwargs):
        out, err = [], []

        def run():
            try:
                out.append(fire(self, *args, **kwargs))
            except BaseException as e:  # re-raised in the caller's thread
                err.append(e)

        t = threading.Thread(target=run)
        t.start()
        t.join()
        if err:
            raise err[0]
        return out[0]

    monkeypatch.setattr(CallbackHandler, "on_init_end", elsewhere)
    with pytest.raises(RuntimeError, match=r"found no Trainer.*attach\(trainer\)"):
        Trainer(model=nlg_model(), args=targs(tmp_path), callbacks=[BALoRACallback(BALoRAConfig(**NLG))])
    trainer = Trainer(model=nlg_model(), args=targs(tmp_path))  # the way out the message gives
    BALoRACallback(BALoRAConfig(**NLG)).attach(trainer)
    assert isinstance(trainer, BALoRATrainerMixin)


def test_one_callback_per_trainer(tmp_path):
    cb = BALoRACallback(BALoRAConfig(**NLG))
    Trainer(model=nlg_model(), args=targs(tmp_path), callbacks=[cb])
    with pytest.raises(ValueError, match="already attached to another trainer"):
        Trainer(model=nlg_model(), args=targs(tmp_path), callbacks=[cb])


def test_add_callback_without_attach_fails_before_step_1(tmp_path):
    model = nlg_model()
    before = adapter(model)
    trainer = Trainer(model=model, args=targs(tmp_path), train_dataset=Rows(tensors("nlg")))
    trainer.add_callback(BALoRACallback(BALoRAConfig(**NLG)))
    with pytest.raises(RuntimeError, match=r"attach\(trainer\)"):
        trainer.train()
    assert trainer.state.global_step == 0 and max_diff(adapter(model), before) == 0


@pytest.mark.parametrize(
    "model, task, match",
    [
        (lambda: tiny_llama(), "nlg", "needs a PEFT LoRA model"),
        (lambda: nlg_model(), "nlu", "task='nlu' but the model is a LlamaForCausalLM"),
        (
            lambda: nlu_model(),
            "nlg",
            "task='nlg' but BertForSequenceClassification has no language-model head",
        ),
    ],
    ids=["no-peft", "nlu-on-causal-lm", "nlg-on-classifier"],
)
def test_clear_errors_at_construction(model, task, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        Trainer(model=model(), args=targs(tmp_path), callbacks=[BALoRACallback(BALoRAConfig(task=task))])


def test_refuses_a_trainer_that_already_has_balora(tmp_path):
    class Already(BALoRATrainerMixin, Trainer):
        pass

    with pytest.raises(ValueError, match="already adds BA-LoRA"):
        Already(model=nlg_model(), args=targs(tmp_path), callbacks=[BALoRACallback()])


def test_trainer_subclass_sft(tmp_path):
    """A Trainer subclass (TRL's SFTTrainer): λ = 0 reproduces it, λ > 0 adds the terms."""
    pytest.importorskip("trl")
    from conftest import tiny_tokenizer
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": f"a b {c}"}] for c in "cdefghij"],
            "completion": [[{"role": "assistant", "content": f"{c} e f g"}] for c in "cdefghij"],
        }
    )

    def sft(config):
        args = SFTConfig(
            output_dir=str(tmp_path),
            max_steps=2,
            per_device_train_batch_size=2,
            logging_steps=1,
            report_to=[],
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            disable_tqdm=True,
            learning_rate=1e-2,
            save_strategy="no",
        )
        cbs = [BALoRACallback(config)] if config is not None else None
        trainer = SFTTrainer(
            model=nlg_model(), args=args, train_dataset=data, processing_class=tiny_tokenizer(), callbacks=cbs
        )
        trainer.train()
        assert isinstance(trainer, SFTTrainer) and isinstance(trainer, BALoRATrainerMixin) == (
            config is not None
        )
        return trainer

    host, off, on = sft(None), sft(BALoRAConfig(**OFF)), sft(BALoRAConfig(**NLG))
    assert losses(off) == pytest.approx(losses(host), rel=0, abs=1e-6)
    assert_same_adapter(adapter(off.model), adapter(host.model), atol=1e-6)
    assert on.state.log_history[1]["balora/consistency"] > 0
    assert losses(on) != pytest.approx(losses(host), abs=1e-3)


# ---------------------------------------------------------------------------------------------- recipes
@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_nlg", "train_nlu"])
def test_recipe_runs_tiny(script, tmp_path, capsys):
    """The integrations/transformers recipes, in this process, on their --tiny models."""
    path = os.path.join(ROOT, "integrations", "transformers", f"{script}.py")
    spec = importlib.util.spec_from_file_location(f"recipe_{script}", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    recipe.main(["--tiny", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "balora/consistency" in out and "saved to" in out
    assert (tmp_path / "balora_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    # PiSSA: the trainable form and its step-0 adapter beside the servable root
    assert (tmp_path / "balora_resume" / "balora_ref" / "adapter_config.json").is_file()
