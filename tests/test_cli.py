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


def _run_cli(argv, capsys):
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
    code, _, err = _run_cli(argv, capsys)
    assert code == 2, err
    assert message in err
    assert not (tmp_path / "balora_demo").exists()  # nothing trained, nothing written


def test_refuses_non_empty_out_before_training(capsys, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = _run_cli(["demo", "--tiny", "--out", str(out)], capsys)
    assert code == 2
    assert "is not empty; choose another directory or pass overwrite=True (--overwrite)" in err
    assert sorted(os.listdir(out)) == ["notes.txt"]
    code, _, err = _run_cli(["export", str(tmp_path), "--out", str(out)], capsys)
    assert code == 2 and "is not empty" in err


# ---------------------------------------------------------------------------------------------- demo (NLG)
@pytest.fixture(scope="module")
def nlg_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "nlg"
    argv = ["demo", "--tiny", "--out", str(out), "--eval-size", "6", "--methods", "pissa,balora"]
    argv += ["--seeds", "2", "--lr", "0.01"]  # a drift well above fp32 rounding: the KLs are compared at 1e-3
    code = cli.main(argv)
    assert code == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


def _settings(out, results):
    from balora_plugins.tools.demo import DemoSettings

    return DemoSettings(**{**results["settings"], "out": str(out)})


def _held_out(out, results):
    from transformers import AutoTokenizer

    from balora_plugins.tools import assets
    from balora_plugins.tools.demo import gsm_splits
    from balora_plugins.tools.demo.nlg import candidates

    s = _settings(out, results)
    tok = AutoTokenizer.from_pretrained(out / "base_model")
    return gsm_splits(tok, assets.gsm_symbolic(candidates(s), s.data_seed), s)[1]


def _news(out, results):
    """The forgetting set rebuilt from the BBC corpus: the first forget_length tokens of the same articles."""
    from transformers import AutoTokenizer

    from balora_plugins.tools import assets

    s = _settings(out, results)
    tok = AutoTokenizer.from_pretrained(out / "base_model")
    data = assets.bbc_news()
    idx, _ = assets.stratified_split(data.labels, s.forget_size, 0, s.data_seed)
    return [tok(data.texts[i], add_special_tokens=False)["input_ids"][: s.forget_length] for i in idx]


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


def _news_logits(model, articles):
    """(all next-token logits, their targets) over the articles: every position but each article's last."""
    with torch.no_grad():
        z = [model(input_ids=torch.tensor([ids])).logits[0, :-1] for ids in articles]
    return torch.cat(z).double(), torch.cat([torch.tensor(ids[1:]) for ids in articles])


def _kl(base_logits, logits):
    """Mean KL(p_base ‖ p) over rows, from materialised fp64 logits."""
    logq, logp = torch.log_softmax(base_logits, -1), torch.log_softmax(logits, -1)
    return (logq.exp() * (logq - logp)).sum(-1).mean().item()


def _metrics(results, method, seed):
    (run,) = [r for r in results["runs"] if r["method"] == method and r["seed"] == seed]
    return run["metrics"]


def test_demo_tiny_writes_report(nlg_demo):
    out, results = nlg_demo
    assert [(r["seed"], r["method"]) for r in results["runs"]] == [
        (0, "pissa"),
        (0, "balora"),
        (1, "pissa"),
        (1, "balora"),
    ]
    assert set(results["summary"]) == {"pissa", "balora"}
    assert {c["metric"] for c in results["comparisons"]} == {
        "answer_nll",
        "news_nll",
        "news_kl",
        "exact_match",
    }
    summary = (out / "summary.md").read_text()
    for text in (
        "| PiSSA |",
        "| BA-LoRA |",
        "| base |",
        "![metrics](metrics.png)",
        "![differences](differences.png)",
        "![loss](loss.png)",
        "![spectrum](spectrum.png)",
        "answer NLL: BA-LoRA − PiSSA",
        "## Per-seed numbers",
        "CPU-seconds",
    ):
        assert text in summary, text
    for name in ("metrics.png", "differences.png", "loss.png", "regularizers.png", "spectrum.png"):
        assert _is_png(out / name), name
    for seed in (0, 1):
        with open(out / f"seed{seed}" / "balora" / "trainer_state.json") as f:
            logged = {k for entry in json.load(f)["log_history"] for k in entry}
        assert {"loss", "balora/consistency", "balora/diversity", "balora/svd", "balora/loss"} <= logged
        with open(out / f"seed{seed}" / "pissa" / "trainer_state.json") as f:
            assert not any(k.startswith("balora/") for entry in json.load(f)["log_history"] for k in entry)
    # BA-LoRA's final output: the servable plain LoRA at the root, the trainable form in balora_resume/
    adapter = out / "seed0" / "balora" / "adapter"
    with open(adapter / "adapter_config.json") as f:
        assert json.load(f)["init_lora_weights"] is True
    assert (adapter / "balora_resume" / "balora_ref" / "adapter_config.json").is_file()
    assert not (out / "seed1" / "balora" / "adapter").exists()  # adapters of the first seed only


def test_demo_seeds_differ_and_share_within_a_seed(nlg_demo):
    """Seeds change the training sample and init (different numbers); the table's mean is the seeds' mean."""
    out, results = nlg_demo
    a, b = _metrics(results, "pissa", 0), _metrics(results, "pissa", 1)
    assert a["answer_nll"] != b["answer_nll"]
    mean = results["summary"]["pissa"]["answer_nll"]
    assert mean["mean"] == pytest.approx((a["answer_nll"] + b["answer_nll"]) / 2)
    assert mean["n"] == 2 and mean["low"] < mean["mean"] < mean["high"]
    (c,) = [c for c in results["comparisons"] if c["metric"] == "answer_nll"]
    d = [
        _metrics(results, "balora", s)["answer_nll"] - _metrics(results, "pissa", s)["answer_nll"]
        for s in (0, 1)
    ]
    assert c["diff_mean"] == pytest.approx(sum(d) / 2)
    # t with 1 degree of freedom: half-width 12.706 · |d0 − d1| / 2
    assert c["diff_high"] - c["diff_mean"] == pytest.approx(12.706205 * abs(d[0] - d[1]) / 2, rel=1e-6)


def test_demo_metrics_match_full_logits(nlg_demo):
    """Base NLL and spectrum, PiSSA's NLL and KL, and the forgetting NLL / KL on BBC News, recomputed from
    materialised logits of reloaded models."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, results = nlg_demo
    held_out = _held_out(out, results)
    base = AutoModelForCausalLM.from_pretrained(out / "base_model").eval()
    base_rows = _full_logits(base, held_out)
    z = torch.cat([r[0] for r in base_rows]).double()
    y = torch.cat([r[1] for r in base_rows])
    nll = torch.nn.functional.cross_entropy(z, y).item()
    m = results["base"]["metrics"]
    assert m["answer_tokens"] == len(y)
    assert m["answer_nll"] == pytest.approx(nll, rel=1e-5)
    sv = torch.linalg.svdvals(z)
    spectrum = torch.tensor(results["spectra"]["base"], dtype=torch.float64)
    torch.testing.assert_close(spectrum[:10], sv[:10], rtol=1e-4, atol=1e-4)
    assert m["svd_top_share"] == pytest.approx((sv[:10].sum() / z.norm()).item(), rel=1e-4)
    articles = _news(out, results)
    zn, yn = _news_logits(base, articles)
    assert m["news_tokens"] == len(yn) == sum(len(a) - 1 for a in articles)
    assert m["news_nll"] == pytest.approx(torch.nn.functional.cross_entropy(zn, yn).item(), rel=1e-5)

    plain = out / "pissa_plain"
    assert cli.main(["export", str(out / "seed0" / "pissa" / "adapter"), "--out", str(plain)]) == 0
    base_again = AutoModelForCausalLM.from_pretrained(out / "base_model")
    tuned = PeftModel.from_pretrained(base_again, plain).eval()
    zt = torch.cat([r[0] for r in _full_logits(tuned, held_out)]).double()
    pm = _metrics(results, "pissa", 0)
    kl = _kl(z, zt)
    assert kl > 0
    assert pm["kl_from_base"] == pytest.approx(kl, rel=1e-3, abs=1e-9)
    assert pm["answer_nll"] == pytest.approx(torch.nn.functional.cross_entropy(zt, y).item(), rel=1e-5)
    znt, _ = _news_logits(tuned, articles)
    news_kl = _kl(zn, znt)
    assert news_kl > 0
    assert pm["news_kl"] == pytest.approx(news_kl, rel=1e-3, abs=1e-9)
    assert pm["news_nll"] == pytest.approx(torch.nn.functional.cross_entropy(znt, yn).item(), rel=1e-5)

    # --merge without --base: the adapter names the demo's saved base model
    merged_dir = out / "pissa_merged"
    assert (
        cli.main(["export", str(out / "seed0" / "pissa" / "adapter"), "--out", str(merged_dir), "--merge"])
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    zm = torch.cat([r[0] for r in _full_logits(merged, held_out)]).double()
    torch.testing.assert_close(zm, zt, rtol=1e-4, atol=1e-5)


def test_report_rerenders_demo_dir(nlg_demo, capsys):
    out, _ = nlg_demo
    code, stdout, _ = _run_cli(["report", str(out)], capsys)
    assert code == 0
    rep = out / "balora_report"
    plots = {"metrics.png", "differences.png", "loss.png", "regularizers.png", "spectrum.png"}
    assert {"report.md", *plots} <= set(os.listdir(rep))
    text = (rep / "report.md").read_text()
    assert "| pissa/seed0 |" in text and "| balora/seed1 |" in text and "report.md" in stdout


# ---------------------------------------------------------------------------------------------- demo (NLU)
def test_demo_nlu_tiny_label_noise_ablation_and_overwrite(tmp_path, capsys):
    out = tmp_path / "nlu"
    (out / "seed0" / "pissa").mkdir(parents=True)  # a stale run of an earlier report
    (out / "seed0" / "pissa" / "trainer_state.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    argv = ["demo", "--task", "nlu", "--tiny", "--out", str(out), "--overwrite", "--label-noise", "0.3"]
    # batch 5 > k = 4: the SVD share of a 4-row batch would be constant (skipped, logged with λ3 = 0)
    argv += ["--batch-size", "5"]
    code, stdout, err = _run_cli([*argv, "--methods", "lora,balora,balora-no-svd"], capsys)
    assert code == 0, err
    assert not (out / "seed0" / "pissa").exists() and (out / "notes.txt").read_text() == "mine"
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["task"] == "nlu" and set(results["summary"]) == {"lora", "balora", "balora-no-svd"}
    assert len(results["runs"]) == 6 and results["data"]["flipped_per_seed"] == {"0": 6, "1": 6}  # 30 % of 20
    assert all(0 <= r["metrics"]["noisy_fit"] <= 1 for r in results["runs"])
    assert len(results["spectra"]["lora"]) == 5  # (N, 5 classes) logits
    assert (
        "macro-F1" in stdout
        and "noisy-label fit" in stdout
        and "| BA-LoRA |" in (out / "summary.md").read_text()
    )
    assert "noisy-label fit: BA-LoRA − BA-LoRA w/o svd" in stdout
    for name in ("metrics.png", "differences.png", "loss.png", "regularizers.png", "spectrum.png"):
        assert _is_png(out / name), name
    # the preset's svd_top_k=5 is a no-op with 5 classes: the demo says so and uses 4
    assert results["balora_config"]["svd_top_k"] == 4 and "svd_top_k=5 >= 5 classes" in stdout
    # the ablation trains with λ3 = 0, BA-LoRA with the preset's λ3
    for method, want in (("balora", results["balora_config"]["lambda_svd"]), ("balora-no-svd", 0.0)):
        with open(out / "seed1" / method / "trainer_state.json") as f:
            logged = [e["balora/lambda_svd"] for e in json.load(f)["log_history"] if "balora/lambda_svd" in e]
        assert logged and all(v == want for v in logged), method

    # the BA-LoRA classifier adapter (PiSSA + trained head) merges into the untouched base it names
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    adapter = out / "seed0" / "balora" / "adapter"
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

    code, stdout, _ = _run_cli(["report", str(run), "--out", str(tmp_path / "rep")], capsys)
    assert code == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| run | 10 | 2.9 | 2 | 2 | 2.5 | 0.1 | -2.1 | -0.51 |" in text
    assert _is_png(tmp_path / "rep" / "loss.png") and _is_png(tmp_path / "rep" / "regularizers.png")
    assert not (tmp_path / "rep" / "spectrum.png").exists()


def test_report_on_sweep_without_balora_terms(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(json.dumps(_state(4, balora=False)))
    code, _, _ = _run_cli(["report", str(tmp_path)], capsys)
    assert code == 0
    files = set(os.listdir(tmp_path / "balora_report"))
    assert "loss.png" in files and "regularizers.png" not in files
    code, _, err = _run_cli(["report", str(tmp_path / "a" / "..")], capsys)
    assert code == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run_cli(["report", str(empty)], capsys)
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

    code, stdout, _ = _run_cli(["export", str(adapter), "--out", str(tmp_path / "plain")], capsys)
    assert code == 0 and "plain LoRA adapter" in stdout
    served = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "plain"
    ).eval()
    with torch.no_grad():
        got = served(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    code, _, _ = _run_cli(
        ["export", str(adapter), "--out", str(tmp_path / "merged"), "--merge", "--base", str(base_dir)],
        capsys,
    )
    assert code == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    code, _, err = _run_cli(
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
