"""`balora export` and `balora report` on bad input and missing dependencies: one line naming the argument, the
value and the fix, exit code 2 (usage) or 1 (runtime), never a traceback; progress on stderr; ``--json`` on
stdout."""

from __future__ import annotations

import json
import os
import sys
import tomllib

import pytest
import torch
from conftest import lora, tiny_llama

from balora_plugins.tools import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv, capsys):
    """(exit code, stdout, the stderr lines) of `balora ARGV` in-process."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def error_line(lines: list[str], command: str) -> str:
    """The one error line of a command (argparse's usage line may precede a usage error)."""
    assert not any("Traceback" in line for line in lines), lines
    errors = [line for line in lines if line.startswith(f"balora {command}: error: ")]
    assert len(errors) == 1, lines
    return errors[0]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A plain LoRA adapter of the tiny llama, whose untouched base is saved beside it (``base/``)."""
    root = tmp_path_factory.mktemp("cli_errors")
    tiny_llama().save_pretrained(root / "base")
    model = lora(tiny_llama(), init=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    model.save_pretrained(root / "adapter")
    return root


# ---------------------------------------------------------------------------------------------- usage: exit 2
def test_merge_with_a_missing_base_folder_is_a_usage_error(adapter, tmp_path, capsys):
    code, _, err = run(["export", str(adapter / "adapter"), "--out", str(tmp_path / "m"), "--merge",
                        "--base", "/nonexistent"], capsys)  # fmt: skip
    assert code == 2
    line = error_line(err, "export")
    assert (
        "argument --base: '/nonexistent' is not a directory; pass the untouched base model's folder" in line
    )
    assert not (tmp_path / "m").exists()


def test_an_adapter_dir_without_an_adapter_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert "holds no adapter_config.json; pass a PEFT adapter folder" in error_line(err, "export")


def test_report_usage_errors(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "trainer_state.json").write_text("{not json")
    code, _, err = run(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert "trainer_state.json' is not a readable trainer_state.json" in error_line(err, "report")
    (tmp_path / "file").write_text("x")
    code, _, err = run(["report", str(tmp_path / "run"), "--out", str(tmp_path / "file")], capsys)
    assert code == 2 and "is a file; pass a directory" in error_line(err, "report")


# ---------------------------------------------------------------------------------------------- runtime: exit 1
def test_report_without_matplotlib_names_the_install(tmp_path, capsys, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "trainer_state.json").write_text(
        json.dumps({"log_history": [{"step": 1, "loss": 2.0}]})
    )
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(
        sys.modules, "matplotlib", None
    )  # `import matplotlib` now fails, as when not installed
    code, out, err = run(["report", str(tmp_path / "run")], capsys)
    assert code == 1 and out == ""
    line = error_line(err, "report")
    assert "needs matplotlib" in line and "pip install 'balora-plugins[report]'" in line
    assert not (tmp_path / "run" / "balora_report").exists()
    # the extra the message names exists and installs matplotlib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert any(dep.startswith("matplotlib") for dep in extras["report"])


def test_merge_with_a_base_that_does_not_load_is_one_runtime_line(adapter, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(["export", str(adapter / "adapter"), "--out", str(tmp_path / "m"), "--merge",
                        "--base", "no-such-org/no-such-model"], capsys)  # fmt: skip
    assert code == 1
    line = error_line(err, "export")
    assert "--base 'no-such-org/no-such-model' did not load as the base model (" in line
    assert line.endswith(
        "pass the untouched base model's folder, or a hub id in the local cache, with --base."
    )
    assert any("loading the base model no-such-org/no-such-model" in e for e in err)  # progress came first


# ---------------------------------------------------------------------------------------------- progress and --json
def test_export_json_lists_the_written_files(adapter, tmp_path, capsys):
    code, out, err = run(
        ["export", str(adapter / "adapter"), "--out", str(tmp_path / "plain"), "--json"], capsys
    )
    assert code == 0
    result = json.loads(out)
    assert result["out"] == str(tmp_path / "plain") and result["merged"] is False
    assert result["files"] == sorted(str(p) for p in (tmp_path / "plain").rglob("*") if p.is_file())
    assert str(tmp_path / "plain" / "adapter_model.safetensors") in result["files"]
    code, out, err = run(["export", str(adapter / "adapter"), "--out", str(tmp_path / "merged"), "--merge",
                          "--base", str(adapter / "base"), "--json"], capsys)  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert result["merged"] is True and str(tmp_path / "merged" / "model.safetensors") in result["files"]
    steps = [line.split("] ", 1)[1] for line in err if line.startswith("balora export: [")]
    assert [s.split(" ")[0] for s in steps] == ["converting", "loading", "merging", "writing"]


def test_report_json_summarises_each_run(tmp_path, capsys):
    history = [
        {"step": 1, "loss": 3.0, "balora/task_loss": 3.1, "balora/svd": -0.5},
        {"step": 2, "loss": 2.0, "balora/task_loss": 2.2, "balora/svd": -0.6},
        {"step": 2, "eval_loss": 2.5},
    ]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    code, out, err = run(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r"), "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["report"] == str(tmp_path / "r" / "report.md") and set(result["plots"]) == {
        "loss",
        "regularizers",
    }
    (summary,) = result["runs"].values()
    assert summary["steps"] == 2 and summary["first_loss"] == 3.0 and summary["min_loss"] == 2.0
    assert summary["last_task_loss"] == 2.2 and summary["last_eval_loss"] == 2.5
    assert summary["terms"] == {"svd": -0.6}  # task_loss is no term
    assert any("wrote" in line and "loss.png" in line for line in err)  # progress on stderr
