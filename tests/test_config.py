"""BALoRAConfig: validation messages, presets against docs/method.md §3, (de)serialisation, schedules."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balora_plugins import PRESETS, BALoRAConfig
from balora_plugins.config import CONFIG_NAME, FIELD_CHOICES, FORMULATIONS, TASKS

LAMBDAS = ("lambda_consistency", "lambda_diversity", "lambda_svd")
FRACTIONS = ("cosine_final_ratio", "warmup_start", "warmup_ramp")


def _raises_naming(field_name: str, value, **extra):
    with pytest.raises(ValueError) as err:
        BALoRAConfig(**{field_name: value}, **extra)
    msg = str(err.value)
    assert field_name in msg, msg
    assert repr(value) in msg or str(value) in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "name,value",
    [
        ("task", "seq2seq"),
        ("formulation", "v3"),
        ("svd_norm", "spectral"),
        ("consistency_schedule", "linear"),
        ("regularizer_schedule", "cosine"),
        ("reference", "teacher"),
        ("on_nonfinite", "ignore"),
        ("lambda_consistency", -0.5),
        ("lambda_diversity", -1e-3),
        ("lambda_svd", float("nan")),
        ("lambda_svd", "0.1"),
        ("svd_top_k", 0),
        ("svd_top_k", -3),
        ("svd_top_k", 2.0),
        ("diversity_top_k", -1),
        ("diversity_top_k", True),
        ("chunk_size", 0),
        ("temperature", 0.0),
        ("temperature", -2.0),
        ("temperature", float("inf")),
        ("cosine_final_ratio", 1.5),
        ("warmup_start", -0.1),
        ("warmup_ramp", 2.0),
        ("eps", 0.0),
        ("shift_labels", "yes"),
    ],
)
def test_invalid_field_raises_naming_field_and_value(name, value):
    _raises_naming(name, value)


def test_choice_errors_list_allowed_values():
    msg = _raises_naming("formulation", "v3")
    for allowed in ("iclr2026", "v5"):
        assert allowed in msg


def test_every_string_field_is_a_choice_with_its_allowed_values():
    """FIELD_CHOICES (what the argument parsers list) covers every str field, with the values docs/method.md names."""
    hints = typing.get_type_hints(BALoRAConfig)
    assert set(FIELD_CHOICES) == {f.name for f in dataclasses.fields(BALoRAConfig) if hints[f.name] is str}
    assert FIELD_CHOICES["consistency_schedule"] == ("constant", "cosine", "adaptive")
    assert FIELD_CHOICES["regularizer_schedule"] == (
        "constant",
        "warmup",
        "linear_warmup",
        "quadratic_warmup",
    )
    for name, allowed in FIELD_CHOICES.items():
        for value in allowed:
            task = {"task": "nlu"} if name == "reference_head" else {}  # an NLU-only choice
            path = {"reference_path": "ref/"} if value == "precomputed" else {}  # its store's folder
            assert getattr(BALoRAConfig(**{name: value, "shift_labels": True, **task}, **path), name) == value


def test_every_field_names_its_tasks_and_a_one_task_field_is_refused_off_its_task():
    """metadata["tasks"] (which doors offer a field, balora_plugins/arguments.py) names real tasks, and an NLU-only
    field can only hold its default on a causal LM — so the NLG-only doors lose nothing by not offering it."""
    tasks = {f.name: f.metadata["tasks"] for f in dataclasses.fields(BALoRAConfig)}
    assert all(t and set(t) <= set(TASKS) for t in tasks.values())
    assert {n for n, t in tasks.items() if t == ("nlu",)} == {"reference_cache", "reference_head"}
    for name, value in (("reference_cache", True), ("reference_head", "current")):
        assert getattr(BALoRAConfig(task="nlu", **{name: value}), name) == value
        with pytest.raises(ValueError, match=f"{name}=.*applies to task='nlu' only"):
            BALoRAConfig(task="nlg", **{name: value})


def test_incompatible_combinations():
    with pytest.raises(ValueError, match=r"warmup_start \+ warmup_ramp"):
        BALoRAConfig(warmup_start=0.9, warmup_ramp=0.2)
    with pytest.raises(ValueError, match="shift_labels=False"):
        BALoRAConfig(task="nlu", shift_labels=False)


def test_unknown_preset_and_keys():
    with pytest.raises(ValueError, match=r"'iclr2027-nlg'.*iclr2026-nlg"):
        BALoRAConfig.from_preset("iclr2027-nlg")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lambda_kl'\]"):
        BALoRAConfig.from_preset("iclr2026-nlg", lambda_kl=0.1)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bogus'\]"):
        BALoRAConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="preset"):
        BALoRAConfig.coerce("nope")
    with pytest.raises(ValueError, match=r"balora_config=3 \(a int\)"):
        BALoRAConfig.coerce(3)


# ---------------------------------------------------------------------------------------------- presets
def test_presets_reproduce_spec():
    nlg = BALoRAConfig.from_preset(
        "iclr2026-nlg"
    )  # docs/method.md §3.1 NLG defaults + the authors' schedules
    assert (nlg.lambda_consistency, nlg.lambda_diversity, nlg.lambda_svd) == (0.025, 0.005, 0.005)
    assert (nlg.svd_top_k, nlg.diversity_top_k, nlg.temperature) == (10, 20, 2.0)
    assert (nlg.consistency_kind, nlg.consistency_temperature, nlg.diversity_kind) == ("kl", 2.0, "entropy")
    assert (nlg.entropy_top_k, nlg.resolved_svd_norm) == (20, "frobenius")
    assert (nlg.consistency_schedule, nlg.regularizer_schedule) == ("cosine", "warmup")
    assert (nlg.cosine_final_ratio, nlg.warmup_start, nlg.warmup_ramp) == (0.1, 0.2, 0.05)

    nlu = BALoRAConfig.from_preset("iclr2026-nlu")  # docs/method.md §3.1 NLU
    assert (nlu.lambda_consistency, nlu.lambda_diversity, nlu.lambda_svd) == (0.15, 0.03, 0.03)
    assert (nlu.svd_top_k, nlu.consistency_temperature) == (5, 2.0)
    assert (nlu.consistency_kind, nlu.diversity_kind, nlu.resolved_svd_norm) == (
        "kl",
        "decorrelation",
        "nuclear",
    )

    for name in ("v5-nlg", "v5-nlu"):  # docs/method.md §3.2
        v5 = BALoRAConfig.from_preset(name)
        assert (v5.lambda_consistency, v5.lambda_diversity, v5.lambda_svd) == (1e-4, 3e-4, 1e-4)
        assert v5.svd_top_k == 3 and v5.resolved_svd_norm == "nuclear" and v5.consistency_temperature == 1.0
    v5g, v5u = BALoRAConfig.from_preset("v5-nlg"), BALoRAConfig.from_preset("v5-nlu")
    assert (v5g.consistency_kind, v5g.diversity_kind, v5g.entropy_top_k) == ("kl", "entropy", 0)
    assert (v5u.consistency_kind, v5u.diversity_kind) == ("mse", "decorrelation")
    assert set(PRESETS) >= {"iclr2026-nlg", "iclr2026-nlu", "v5-nlg", "v5-nlu"}


def test_auto_svd_norm_and_v5_ignores_top_k():
    assert BALoRAConfig(task="nlg", svd_norm="auto").resolved_svd_norm == "frobenius"
    assert BALoRAConfig(task="nlu", svd_norm="auto").resolved_svd_norm == "nuclear"
    assert BALoRAConfig(formulation="v5", svd_norm="auto").resolved_svd_norm == "nuclear"
    assert BALoRAConfig(formulation="v5", diversity_top_k=20).entropy_top_k == 0


def test_from_preset_overrides_and_leaves_preset_untouched():
    c = BALoRAConfig.from_preset("iclr2026-nlg", lambda_svd=0.0, chunk_size=64, svd_norm="nuclear")
    assert (c.lambda_svd, c.chunk_size, c.resolved_svd_norm) == (0.0, 64, "nuclear")
    assert c.lambda_consistency == 0.025
    assert PRESETS["iclr2026-nlg"]["lambda_svd"] == 0.005
    with pytest.raises(ValueError, match="svd_top_k=0"):
        BALoRAConfig.from_preset("iclr2026-nlu", svd_top_k=0)


def test_coerce():
    assert BALoRAConfig.coerce(None) == BALoRAConfig.from_preset("iclr2026-nlg")
    assert BALoRAConfig.coerce("v5-nlu") == BALoRAConfig.from_preset("v5-nlu")
    assert BALoRAConfig.coerce({"preset": "iclr2026-nlu", "svd_top_k": 2}).svd_top_k == 2
    c = BALoRAConfig(lambda_svd=0.5)
    assert BALoRAConfig.coerce(c) is c


# ---------------------------------------------------------------------------------------------- round trips
def test_dict_json_and_save_pretrained_round_trip(tmp_path):
    c = BALoRAConfig.from_preset("iclr2026-nlu", lambda_svd=0.125, svd_top_k=2, chunk_size=17)
    assert BALoRAConfig.from_dict(c.to_dict()) == c
    assert BALoRAConfig.from_json(c.to_json_string()) == c
    d = json.loads(c.to_json_string())
    assert d == c.to_dict() and set(d) == {f.name for f in dataclasses.fields(BALoRAConfig)}
    path = c.save_pretrained(tmp_path / "ckpt")
    assert path.endswith(CONFIG_NAME)
    assert BALoRAConfig.from_pretrained(tmp_path / "ckpt") == c
    assert BALoRAConfig.from_json(path) == c


# ---------------------------------------------------------------------------------------------- NLU SVD no-op
def test_check_num_classes_warns_when_svd_is_constant():
    c = BALoRAConfig.from_preset("iclr2026-nlu")  # k = 5
    with pytest.warns(UserWarning, match=r"svd_top_k=5 >= number of classes \(2\)"):
        assert c.check_num_classes(2) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert c.check_num_classes(6) is True
        assert BALoRAConfig.from_preset("iclr2026-nlu", lambda_svd=0.0).check_num_classes(2) is True
        assert BALoRAConfig.from_preset("iclr2026-nlg").check_num_classes(2) is True


# ---------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 0.5, 0.8, 1.0])
def test_cosine_schedule(p):
    c = BALoRAConfig(lambda_consistency=0.04, consistency_schedule="cosine", regularizer_schedule="constant")
    hand = 0.1 * 0.04 + (0.04 - 0.1 * 0.04) * (1 + math.cos(math.pi * p)) / 2
    assert c.lambdas_at(p)["consistency"] == pytest.approx(hand, rel=1e-12)
    assert c.lambdas_at(p)["diversity"] == c.lambda_diversity  # untouched by the cosine


def test_cosine_end_points():
    c = BALoRAConfig(lambda_consistency=0.04, consistency_schedule="cosine")
    assert c.lambdas_at(0.0)["consistency"] == pytest.approx(0.04)
    assert c.lambdas_at(0.5)["consistency"] == pytest.approx(0.55 * 0.04)
    assert c.lambdas_at(1.0)["consistency"] == pytest.approx(0.004)
    assert c.lambdas_at(7.0)["consistency"] == pytest.approx(0.004)  # progress is clamped to [0, 1]


@pytest.mark.parametrize(
    "p,factor",
    [
        (-1.0, 0.0),
        (0.0, 0.0),
        (0.1, 0.0),
        (0.1999, 0.0),
        (0.2, 0.0),
        (0.21, 0.2),
        (0.225, 0.5),
        (0.24, 0.8),
        (0.25, 1.0),
        (0.6, 1.0),
        (1.0, 1.0),
    ],
)
def test_warmup_schedule(p, factor):
    c = BALoRAConfig(
        lambda_diversity=0.03, lambda_svd=0.07, regularizer_schedule="warmup", consistency_schedule="constant"
    )
    lam = c.lambdas_at(p)
    assert lam["diversity"] == pytest.approx(0.03 * factor, abs=1e-12)
    assert lam["svd"] == pytest.approx(0.07 * factor, abs=1e-12)
    assert lam["consistency"] == c.lambda_consistency


def test_constant_schedules_and_zero_ramp():
    c = BALoRAConfig(consistency_schedule="constant", regularizer_schedule="constant")
    assert all(c.lambdas_at(p) == c.lambdas for p in (0.0, 0.3, 1.0))
    step = BALoRAConfig(regularizer_schedule="warmup", warmup_ramp=0.0, warmup_start=0.5)
    assert step.lambdas_at(0.49)["svd"] == 0.0 and step.lambdas_at(0.5)["svd"] == step.lambda_svd


# ---------------------------------------------------------------------------------------------- property-based
_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12)


def _invalid_values():
    cases = [
        st.tuples(st.just(name), _text.filter(lambda s, a=allowed: s not in a))
        for name, allowed in FIELD_CHOICES.items()
    ]
    neg = st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False)
    nonfinite = st.sampled_from([float("nan"), float("inf"), float("-inf")])
    cases += [st.tuples(st.sampled_from(LAMBDAS), st.one_of(neg, nonfinite))]
    cases += [st.tuples(st.just("svd_top_k"), st.integers(max_value=0))]
    cases += [st.tuples(st.just("diversity_top_k"), st.integers(max_value=-1))]
    cases += [st.tuples(st.just("chunk_size"), st.integers(max_value=0))]
    cases += [st.tuples(st.sampled_from(["svd_top_k", "chunk_size"]), st.floats(min_value=1, max_value=1e3))]
    cases += [
        st.tuples(st.just("temperature"), st.one_of(st.floats(max_value=0.0, allow_nan=False), nonfinite))
    ]
    out = st.one_of(
        st.floats(min_value=1.0, exclude_min=True, allow_infinity=False), st.floats(max_value=-1e-9)
    )
    cases += [st.tuples(st.sampled_from(FRACTIONS), out)]
    cases += [st.tuples(st.just("eps"), st.floats(max_value=0.0, allow_nan=False))]
    cases += [st.tuples(st.just("shift_labels"), st.sampled_from([0, 1, "True", None]))]
    return st.one_of(*cases)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_invalid_values())
def test_property_invalid_values_raise_naming_the_field(case):
    name, value = case
    with pytest.raises(ValueError) as err:
        BALoRAConfig(**{name: value})
    assert f"BALoRAConfig.{name}" in str(err.value)


@st.composite
def _valid_configs(draw):
    kw = {name: draw(st.sampled_from(allowed)) for name, allowed in FIELD_CHOICES.items()}
    frac = st.floats(min_value=0.0, max_value=1.0)
    for name in LAMBDAS:
        kw[name] = draw(st.floats(min_value=0.0, max_value=10.0))
    kw["svd_top_k"] = draw(st.integers(1, 64))
    kw["diversity_top_k"] = draw(st.integers(0, 64))
    kw["chunk_size"] = draw(st.integers(1, 4096))
    kw["temperature"] = draw(st.floats(min_value=1e-3, max_value=10.0))
    kw["cosine_final_ratio"] = draw(frac)
    kw["warmup_start"] = draw(frac)
    kw["warmup_ramp"] = draw(st.floats(min_value=0.0, max_value=1.0 - kw["warmup_start"]))
    kw["eps"] = draw(st.floats(min_value=1e-12, max_value=1e-3))
    kw["shift_labels"] = True if kw["task"] == "nlu" else draw(st.booleans())
    if kw["task"] == "nlg":
        kw["reference_head"] = "initial"  # reference_head='current' is NLU-only
    if kw["reference"] == "precomputed" and kw["task"] == "nlu":  # causal LMs only
        kw["reference"] = "auto"
    elif kw["reference"] == "precomputed":  # with the folder of its store
        kw["reference_path"] = "ref/"
    return kw


@settings(max_examples=100, deadline=None)
@given(_valid_configs(), st.floats(min_value=0.0, max_value=1.0))
def test_property_valid_configs_round_trip(kw, progress):
    c = BALoRAConfig(**kw)
    assert BALoRAConfig.from_dict(c.to_dict()) == c
    assert BALoRAConfig.from_json(c.to_json_string()) == c
    lam = c.lambdas_at(progress)
    for key, base in c.lambdas.items():  # schedules only ever scale the weights down
        assert 0.0 <= lam[key] <= base + 1e-15


# ---------------------------------------------------------------------------------------------- defaults
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_defaults_are_the_preset_matching_task_and_formulation(task, formulation):
    name = f"{formulation}-{task}"
    assert BALoRAConfig(task=task, formulation=formulation) == BALoRAConfig.from_preset(name)
    assert BALoRAConfig.from_dict({"task": task, "formulation": formulation}) == BALoRAConfig.from_preset(
        name
    )
    assert BALoRAConfig(task=task, formulation=formulation, svd_top_k=2) == BALoRAConfig.from_preset(
        name, svd_top_k=2
    )


def test_unset_fields_never_take_another_tasks_values():
    nlu = BALoRAConfig(task="nlu")  # was: the NLG weights (0.025, 0.005, 0.005) and k = 10
    assert (nlu.lambda_consistency, nlu.lambda_diversity, nlu.lambda_svd, nlu.svd_top_k) == (
        0.15,
        0.03,
        0.03,
        5,
    )
    v5 = BALoRAConfig(formulation="v5")  # was: the iclr2026 weights
    assert (v5.lambda_consistency, v5.svd_top_k, v5.temperature) == (1e-4, 3, 1.0)
    assert BALoRAConfig() == BALoRAConfig.from_preset("iclr2026-nlg") == BALoRAConfig.coerce(None)


def test_dict_without_preset_overlays_the_default_preset():
    c = BALoRAConfig.coerce({"lambda_svd": 0.01})  # was: constant schedules (the preset's were dropped)
    assert (c.consistency_schedule, c.regularizer_schedule) == ("cosine", "warmup")
    assert c == BALoRAConfig.from_preset("iclr2026-nlg", lambda_svd=0.01)
    assert BALoRAConfig.coerce({"task": "nlu", "lambda_svd": 0.0}) == BALoRAConfig.from_preset(
        "iclr2026-nlu", lambda_svd=0.0
    )
    explicit = BALoRAConfig.coerce({"lambda_svd": 0.01, "regularizer_schedule": "constant"})
    assert explicit.regularizer_schedule == "constant" and explicit.consistency_schedule == "cosine"
