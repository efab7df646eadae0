"""The `balora` command end to end on tiny models (seconds, offline): demo, report, export, bench dispatch.

Numbers in the demo's report are checked against independent computations: full-vocabulary logits and the
model's own cross-entropy instead of the demo's chunked output-head path, ``torch.linalg.svdvals`` of the
materialised logits instead of the Gram-factor spectrum, and the exported plain LoRA on the untouched base
instead of the PiSSA model it was trained as.
"""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch
from conftest import batch, lora, tiny_llama

from balora_plugins.tools import cli
from balora_plugins.tools.demo import extract_answer, macro_f1

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(argv, capsys):
    """(exit code, stdout, stderr) of `balora ARGV` run in-process."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _is_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == PNG_MAGIC and os.path.getsize(path) > 5000


# ---------------------------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required"),
        (["demo", "--methods", "lora,qlora"], "--methods lora,qlora: allowed are lora, pissa, balora"),
        (["demo", "--methods", "pissa,pissa"], "names a method twice"),
        (["demo", "--steps", "0"], "argument --steps: 0 must be >= 1"),
        (["demo", "--lr", "abc"], "argument --lr: 'abc' is not a number"),
        (["demo", "--task", "nlu", "--preset", "iclr2026-nlg"], "is for task 'nlg' but --task is 'nlu'"),
        (["demo", "--preset", "iclr2099"], "--preset 'iclr2099' is unknown; choose one of"),
        (["demo", "--tiny", "--model", "some/model"], "cannot be combined with --model"),
        (["demo", "--device", "tpu"], "--device 'tpu' is not allowed; choose auto, cpu or cuda"),
        (
            ["demo", "--task", "nlu", "--tiny", "--train-size", "2000", "--eval-size", "500"],
            "exceed the 2225",
        ),
        (["export", "adapter", "--out", "x", "--base", "b"], "--base and --dtype only apply with --merge"),
        (
            ["export", "adapter", "--out", "x", "--dtype", "bfloat16"],
            "--base and --dtype only apply with --merge",
        ),
        (["export", "no_such_adapter", "--out", "x"], "ADAPTER_DIR 'no_such_adapter' is not a directory"),
        (["report", "no_such_run"], "RUN_DIR 'no_such_run' is not a directory"),
    ],
)
def test_usage_errors_exit_2_with_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapter").mkdir()
    code, _, err = _run(argv, capsys)
    assert code == 2, err
    assert message in err
    assert not (tmp_path / "balora_demo").exists()  # nothing trained, nothing written


def test_refuses_non_empty_out_before_training(capsys, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = _run(["demo", "--tiny", "--out", str(out)], capsys)
    assert code == 2
    assert "is not empty; choose another directory or pass overwrite=True (--overwrite)" in err
    assert sorted(os.listdir(out)) == ["notes.txt"]
    code, _, err = _run(["export", str(tmp_path), "--out", str(out)], capsys)
    assert code == 2 and "is not empty" in err


# ---------------------------------------------------------------------------------------------- demo (NLG)
@pytest.fixture(scope="module")
def nlg_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "nlg"
    code = cli.main(["demo", "--tiny", "--out", str(out), "--eval-size", "6"])
    assert code == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


def _held_out(out, results):
    from transformers import AutoTokenizer

    from balora_plugins.tools import assets
    from balora_plugins.tools.demo import DemoSettings, gsm_splits

    s = DemoSettings(**{**results["settings"], "out": str(out)})
    tok = AutoTokenizer.from_pretrained(out / "base_model")
    dataset = assets.gsm_symbolic(4 * (s.train_size + s.eval_size) + 64, s.seed)
    return gsm_splits(tok, dataset, s)[1]


def _full_logits(model, examples):
    """Per held-out example: the full-vocabulary logits (T-1, V) at the answer-predicting positions and targets."""
    rows = []
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.input_ids])
            labels = torch.tensor(e.labels)
            logits = model(input_ids=ids).logits[0, :-1]
            keep = labels[1:] != -100
            rows.append((logits[keep], labels[1:][keep]))
    return rows


def test_demo_tiny_writes_report(nlg_demo):
    out, results = nlg_demo
    assert set(results["models"]) == {"base", "pissa", "balora"}
    summary = (out / "summary.md").read_text()
    for text in ("| PiSSA |", "| BA-LoRA |", "| base |", "![loss](loss.png)", "![spectrum](spectrum.png)"):
        assert text in summary
    for name in ("loss.png", "regularizers.png", "spectrum.png"):
        assert _is_png(out / name), name
    with open(out / "balora" / "trainer_state.json") as f:
        logged = {k for entry in json.load(f)["log_history"] for k in entry}
    assert {"loss", "balora/consistency", "balora/diversity", "balora/svd", "balora/loss"} <= logged
    with open(out / "pissa" / "trainer_state.json") as f:
        assert not any(k.startswith("balora/") for entry in json.load(f)["log_history"] for k in entry)
    # BA-LoRA's final output: the servable plain LoRA at the root, the trainable form in balora_resume/
    with open(out / "balora" / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["init_lora_weights"] is True
    assert (out / "balora" / "adapter" / "balora_resume" / "balora_ref" / "adapter_config.json").is_file()


def test_demo_metrics_match_full_logits(nlg_demo):
    """Base NLL and spectrum, and PiSSA's NLL and KL, recomputed from materialised logits of reloaded models."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, results = nlg_demo
    held_out = _held_out(out, results)
    base = AutoModelForCausalLM.from_pretrained(out / "base_model").eval()
    base_rows = _full_logits(base, held_out)
    z = torch.cat([r[0] for r in base_rows]).double()
    y = torch.cat([r[1] for r in base_rows])
    nll = torch.nn.functional.cross_entropy(z, y).item()
    m = results["models"]["base"]["metrics"]
    assert m["answer_tokens"] == len(y)
    assert m["answer_nll"] == pytest.approx(nll, rel=1e-5)
    sv = torch.linalg.svdvals(z)
    spectrum = torch.tensor(results["spectra"]["base"], dtype=torch.float64)
    torch.testing.assert_close(spectrum[:10], sv[:10], rtol=1e-4, atol=1e-4)
    assert m["svd_top_share"] == pytest.approx((sv[:10].sum() / z.norm()).item(), rel=1e-4)

    plain = out / "pissa_plain"
    assert cli.main(["export", str(out / "pissa" / "adapter"), "--out", str(plain)]) == 0
    base_again = AutoModelForCausalLM.from_pretrained(out / "base_model")
    tuned = PeftModel.from_pretrained(base_again, plain).eval()
    tuned_rows = _full_logits(tuned, held_out)
    zt = torch.cat([r[0] for r in tuned_rows]).double()
    logp, logq = torch.log_softmax(zt, -1), torch.log_softmax(z, -1)
    kl = (logq.exp() * (logq - logp)).sum(-1).mean().item()
    pm = results["models"]["pissa"]["metrics"]
    assert kl > 0
    assert pm["kl_from_base"] == pytest.approx(kl, rel=1e-3, abs=1e-9)
    assert pm["answer_nll"] == pytest.approx(torch.nn.functional.cross_entropy(zt, y).item(), rel=1e-5)

    # --merge without --base: the adapter names the demo's saved base model
    assert (
        cli.main(["export", str(out / "pissa" / "adapter"), "--out", str(out / "pissa_merged"), "--merge"])
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(out / "pissa_merged").eval()
    zm = torch.cat([r[0] for r in _full_logits(merged, held_out)]).double()
    torch.testing.assert_close(zm, zt, rtol=1e-4, atol=1e-5)


def test_report_rerenders_demo_dir(nlg_demo, capsys):
    out, _ = nlg_demo
    code, stdout, _ = _run(["report", str(out)], capsys)
    assert code == 0
    rep = out / "balora_report"
    assert {"report.md", "loss.png", "regularizers.png", "spectrum.png"} <= set(os.listdir(rep))
    assert "| pissa |" in (rep / "report.md").read_text() and "report.md" in stdout


# ---------------------------------------------------------------------------------------------- demo (NLU)
def test_demo_nlu_tiny_overwrite_replaces_only_its_own_files(tmp_path, capsys):
    out = tmp_path / "nlu"
    (out / "pissa").mkdir(parents=True)  # a stale run of an earlier report
    (out / "pissa" / "trainer_state.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    code, stdout, err = _run(["demo", "--task", "nlu", "--tiny", "--out", str(out), "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "pissa").exists() and (out / "notes.txt").read_text() == "mine"
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["task"] == "nlu" and set(results["models"]) == {"base", "lora", "balora"}
    assert len(results["spectra"]["lora"]) == 5  # (N, 5 classes) logits
    assert "macro-F1" in stdout and "| BA-LoRA |" in (out / "summary.md").read_text()
    for name in ("loss.png", "regularizers.png", "spectrum.png"):
        assert _is_png(out / name), name
    # the preset's svd_top_k=5 is a no-op with 5 classes: the demo says so and uses 4
    assert results["balora_config"]["svd_top_k"] == 4 and "svd_top_k=5 >= 5 classes" in stdout

    # the BA-LoRA classifier adapter (PiSSA + trained head) merges into the untouched base it names
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    adapter = out / "balora" / "adapter"
    assert cli.main(["export", str(adapter), "--out", str(tmp_path / "plain")]) == 0
    assert cli.main(["export", str(adapter), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    probe = {
        "input_ids": torch.tensor([[2, 40, 41, 42, 43, 3], [2, 50, 51, 3, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
    }
    base = AutoModelForSequenceClassification.from_pretrained(out / "base_model").eval()
    served = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(out / "base_model"), tmp_path / "plain"
    ).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        want = served(**probe).logits
        assert (base(**probe).logits - want).abs().max() > 1e-4
        torch.testing.assert_close(merged(**probe).logits, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- report
def _state(steps, offset=0.0, balora=True):
    history = []
    for s in range(1, steps + 1):
        entry = {"step": s, "epoch": s / steps, "loss": 3.0 - 0.1 * s + offset, "learning_rate": 1e-4}
        if balora:
            entry.update(
                {
                    "balora/consistency": 0.01 * s,
                    "balora/diversity": -2.0 - 0.01 * s,
                    "balora/svd": -0.5 - 0.001 * s,
                    "balora/loss": -0.02,
                    "balora/lambda_svd": 0.005,
                }
            )
        history.append(entry)
    history.append({"step": steps, "eval_loss": 2.5 + offset, "eval_balora/svd": -0.4})
    history.append({"step": steps, "train_runtime": 1.0, "train_loss": 2.0})
    return {"global_step": steps, "max_steps": steps, "log_history": history}


def test_report_on_trainer_checkpoints(tmp_path, capsys):
    """A transformers/TRL/axolotl output dir with only checkpoints: the latest checkpoint's log is used."""
    from balora_plugins.tools.report import find_runs, load_history, series, term_names

    run = tmp_path / "run"
    for step, offset in ((5, 100.0), (10, 0.0)):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(_state(step, offset)))
    runs = find_runs(str(run))
    assert runs == {"run": str(run / "checkpoint-10" / "trainer_state.json")}
    history = load_history(runs["run"])
    assert series(history, "loss") == (
        [float(s) for s in range(1, 11)],
        [3.0 - 0.1 * s for s in range(1, 11)],
    )
    assert term_names({"run": history}) == ["consistency", "diversity", "svd"]

    code, stdout, _ = _run(["report", str(run), "--out", str(tmp_path / "rep")], capsys)
    assert code == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| run | 10 | 2.9 | 2 | 2 | 2.5 | 0.1 | -2.1 | -0.51 |" in text
    assert _is_png(tmp_path / "rep" / "loss.png") and _is_png(tmp_path / "rep" / "regularizers.png")
    assert not (tmp_path / "rep" / "spectrum.png").exists()


def test_report_on_sweep_without_balora_terms(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(json.dumps(_state(4, balora=False)))
    code, _, _ = _run(["report", str(tmp_path)], capsys)
    assert code == 0
    files = set(os.listdir(tmp_path / "balora_report"))
    assert "loss.png" in files and "regularizers.png" not in files
    code, _, err = _run(["report", str(tmp_path / "a" / "..")], capsys)
    assert code == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(["report", str(empty)], capsys)
    assert code == 2 and "found no trainer_state.json" in err


# ---------------------------------------------------------------------------------------------- export
def test_export_pissa_adapter_serves_on_untouched_base(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from balora_plugins.core.export import INITIAL_DIR, save_initial_adapter

    base_dir = tmp_path / "base"
    tiny_llama(seed=3).save_pretrained(base_dir)
    model = lora(AutoModelForCausalLM.from_pretrained(base_dir), init="pissa")
    adapter = tmp_path / "adapter"
    save_initial_adapter(model, str(adapter / INITIAL_DIR), adapter_name="default")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        loss = model(**batch(seed=step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(adapter)
    probe = batch(seed=9)
    with torch.no_grad():
        want = model.eval()(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        untouched = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        assert (
            untouched(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits - want
        ).abs().max() > 1e-3

    code, stdout, _ = _run(["export", str(adapter), "--out", str(tmp_path / "plain")], capsys)
    assert code == 0 and "plain LoRA adapter" in stdout
    served = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "plain"
    ).eval()
    with torch.no_grad():
        got = served(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    code, _, _ = _run(
        ["export", str(adapter), "--out", str(tmp_path / "merged"), "--merge", "--base", str(base_dir)],
        capsys,
    )
    assert code == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    code, _, err = _run(
        ["export", str(adapter), "--out", str(tmp_path / "merged"), "--merge", "--base", str(base_dir)],
        capsys,
    )
    assert code == 2 and "is not empty" in err


# ---------------------------------------------------------------------------------------------- bench, helpers
def test_bench_dispatches_remaining_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("balora_plugins.tools.bench")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "balora_plugins.tools.bench", fake)
    assert cli.main(["bench", "--help", "--steps", "3"]) == 7
    assert seen == [["--help", "--steps", "3"]]


@pytest.mark.parametrize(
    "text, want",
    [
        ("He earns 12 a day.\n12 * 30 = 360\n#### 360", "360"),
        ("#### 1,234.5 dollars", "1234.5"),
        ("so 7 - 9 = -2, the answer is -2", "-2"),
        ("no number here", None),
        ("steps 3 and 4 #### ", "4"),
    ],
)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_macro_f1_by_hand():
    gold = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 2, 0]
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp1 fp0 fn1 -> 2/3
    assert macro_f1(pred, gold, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert (
        macro_f1([0, 0], [0, 0], 2) == 1.0
    )  # a class neither present nor predicted is left out (as sklearn)
