"""The demo's statistics and settings, against independent computations (milliseconds, no model).

* Student-t: the closed-form CDF against numerical integration of the t density, quantiles against printed
  tables; intervals of known inputs against hand-computed values.
* Paired bootstrap: exact percentiles of a two-point sample (its resampled means take three values).
* Verdicts: a winner is named only when the interval excludes zero; one seed gives no verdict.
* Label noise, method ablations, seeds and the CLI generated from ``DemoSettings``.
"""

from __future__ import annotations

import argparse
import math

import pytest

from balora_plugins.tools import cli
from balora_plugins.tools.demo import (
    METHODS,
    DemoSettings,
    DemoUsageError,
    cli_fields,
    flip_labels,
    resolve_settings,
    results_table,
    verdict,
)
from balora_plugins.tools.demo.stats import (
    Comparison,
    Interval,
    bootstrap_interval,
    compare,
    paired_differences,
    t_cdf_two_sided,
    t_interval,
    t_quantile,
)
from balora_plugins.tools.demo.tables import comparison_pairs, comparisons, summarise

LABELS = {"balora": "BA-LoRA", "pissa": "PiSSA", "lora": "LoRA"}


# ---------------------------------------------------------------------------------------------- Student t
def _t_density(x: float, df: int) -> float:
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    return c * (1 + x * x / df) ** (-(df + 1) / 2)


def _simpson(f, a: float, b: float, n: int = 20_000) -> float:
    h = (b - a) / n
    return h / 3 * (f(a) + f(b) + sum((4 if i % 2 else 2) * f(a + i * h) for i in range(1, n)))


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("t", [0.3, 1.0, 2.5, 7.0])
def test_t_cdf_matches_integrated_density(df, t):
    want = 2 * _simpson(lambda x: _t_density(x, df), 0.0, t)
    assert t_cdf_two_sided(t, df) == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize(
    "df, q975",  # two-sided 95 % critical values as printed in statistics tables
    [
        (1, 12.706205),
        (2, 4.302653),
        (3, 3.182446),
        (4, 2.776445),
        (9, 2.262157),
        (30, 2.042272),
        (120, 1.979930),
    ],
)
def test_t_quantile_matches_tables(df, q975):
    assert t_quantile(0.975, df) == pytest.approx(q975, abs=1e-6)


def test_t_quantile_tends_to_the_normal_quantile():
    assert t_quantile(0.975, 10_000) == pytest.approx(1.960201, abs=1e-6)
    assert t_quantile(0.95, 5) == pytest.approx(2.015048, abs=1e-6)


def test_t_interval_known_inputs():
    iv = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, half-width 4.302653 / sqrt(3)
    assert (iv.mean, iv.n, iv.kind) == (2.0, 3, "t")
    assert iv.low == pytest.approx(2 - 2.484138, abs=1e-6)
    assert iv.high == pytest.approx(2 + 2.484138, abs=1e-6)
    # the numbers: BA-LoRA − PiSSA answer NLL on seeds 0, 1, 2 flips sign -> spans zero
    iv = t_interval([-0.0012, -0.0014, 0.0011])
    assert iv.mean == pytest.approx(-0.0005, abs=1e-12)
    assert iv.low == pytest.approx(-0.0005 - 4.302653 * 0.0013892 / math.sqrt(3), abs=1e-6)
    assert iv.low < 0 < iv.high and not iv.excludes_zero


def test_one_value_has_no_interval():
    iv = t_interval([0.5])
    assert iv.mean == 0.5 and not iv.defined and not iv.excludes_zero
    assert math.isnan(iv.low) and math.isnan(iv.high)


def test_intervals_refuse_non_finite_or_empty_input():
    with pytest.raises(ValueError, match="finite"):
        t_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="at least one"):
        t_interval([])


# ---------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_percentiles_of_a_two_point_sample():
    # resampled means of {0, 1} are 0, 0.5, 1 with probability 1/4, 1/2, 1/4: the 2.5 % and 97.5 %
    # percentiles of 10,000 resamples are 0 and 1 (each end has ~2,500 resamples)
    iv = bootstrap_interval([0.0, 1.0])
    assert (iv.mean, iv.low, iv.high, iv.kind) == (0.5, 0.0, 1.0, "bootstrap")


def test_bootstrap_is_deterministic_and_inside_the_data_range():
    values = [0.3, -0.1, 0.4, 0.2, 0.25, 0.1, 0.35, 0.05, 0.15, 0.3]
    a, b = bootstrap_interval(values), bootstrap_interval(values)
    assert a == b
    assert min(values) <= a.low < a.mean < a.high <= max(values)
    # with 10 values the percentile interval is close to the t interval (both ~ mean ± 2·se)
    t = t_interval(values)
    assert a.low == pytest.approx(t.low, abs=0.04) and a.high == pytest.approx(t.high, abs=0.04)


def test_degenerate_intervals():
    assert Interval(0.0, 0.0, 0.0, 3, "t").excludes_zero is False  # all differences exactly 0
    assert t_interval([0.2, 0.2, 0.2]).excludes_zero  # a constant, non-zero difference
    assert bootstrap_interval([0.0, 0.0, 0.0]).excludes_zero is False


# ---------------------------------------------------------------------------------------------- verdicts
def test_paired_differences_use_common_seeds_in_order():
    a = {2: 1.0, 0: 3.0, 1: 2.0}
    b = {0: 1.0, 1: 1.5, 3: 9.0, 2: 1.5}
    assert paired_differences(a, b) == [2.0, 0.5, -0.5]


def test_verdict_names_no_winner_when_the_interval_spans_zero():
    per_seed = {"balora": {0: 0.9349, 1: 0.9336, 2: 0.9371}, "pissa": {0: 0.9361, 1: 0.9350, 2: 0.9360}}
    c = compare(per_seed, "answer_nll", "balora", "pissa", lower_is_better=True)
    assert c.interval.low < 0 < c.interval.high and not c.significant
    line = c.verdict(LABELS, "answer NLL", digits=3)
    assert line.endswith("not significant at this size")
    assert "better" not in line and "BA-LoRA − PiSSA = -0.0005" in line


def test_verdict_names_the_winner_when_the_interval_excludes_zero():
    per_seed = {"balora": {0: 0.90, 1: 0.91, 2: 0.92}, "pissa": {0: 0.95, 1: 0.97, 2: 0.96}}
    c = compare(per_seed, "answer_nll", "balora", "pissa", lower_is_better=True)
    assert c.significant and c.interval.high < 0
    assert c.verdict(LABELS, "answer NLL").endswith("BA-LoRA better (significant)")
    higher_better = compare(per_seed, "accuracy", "balora", "pissa", lower_is_better=False)
    assert higher_better.verdict(LABELS, "accuracy").endswith("PiSSA better (significant)")
    neutral = compare(per_seed, "svd_top_share", "balora", "pissa", lower_is_better=None)
    assert neutral.verdict(LABELS, "share").endswith("BA-LoRA lower than PiSSA (significant)")


def test_one_seed_gives_no_verdict():
    c = compare({"balora": {0: 0.5}, "pissa": {0: 0.7}}, "answer_nll", "balora", "pissa", True)
    assert not c.significant
    assert "1 seed: no interval, no verdict" in c.verdict(LABELS, "answer NLL")


def test_compare_without_common_seeds_is_an_error():
    with pytest.raises(ValueError, match="share no seed"):
        compare({"a": {0: 1.0}, "b": {1: 1.0}}, "m", "a", "b", True)


def _runs(values: dict[str, list[float]], key: str = "answer_nll") -> list[dict]:
    return [
        {"seed": seed, "method": method, "metrics": {key: v, "seconds_per_step": 1.0}}
        for method, vs in values.items()
        for seed, v in enumerate(vs)
    ]


def test_table_and_verdict_lines_from_runs():
    runs = _runs({"lora": [1.0, 1.2, 1.1], "pissa": [0.96, 0.95, 0.97], "balora": [0.90, 0.91, 0.92]})
    results = {
        "task": "nlg",
        "runs": runs,
        "settings": {"interval": "t"},
        "base": {"metrics": {"answer_nll": 1.4}},
    }
    summary = summarise(runs, "nlg")
    assert summary["balora"]["answer_nll"] == t_interval([0.90, 0.91, 0.92])
    table = results_table(results, markdown=True)
    half = 4.302653 * 0.01 / math.sqrt(3)  # sd of 0.90, 0.91, 0.92 is 0.01
    assert f"| BA-LoRA | 0.9100 ± {half:.4f} | 1.00 |" in table
    assert "| base | 1.4000 | – |" in table
    lines = verdict(results)
    assert lines[0].startswith("answer NLL: BA-LoRA − PiSSA = -0.05") and lines[0].endswith(
        "BA-LoRA better (significant)"
    )
    assert lines[1].startswith("answer NLL: BA-LoRA − LoRA = -0.19")
    diffs = [0.90 - 1.0, 0.91 - 1.2, 0.92 - 1.1]  # -0.1, -0.29, -0.18: mean -0.19, sd 0.0954
    assert comparisons(runs, "nlg")[1].interval == t_interval(diffs)
    assert not comparisons(runs, "nlg")[1].significant and lines[1].endswith("not significant at this size")


def test_comparison_pairs_include_ablations():
    assert comparison_pairs(["lora", "pissa", "balora"]) == [("balora", "pissa"), ("balora", "lora")]
    assert comparison_pairs(["pissa", "balora", "balora-no-svd"]) == [
        ("balora", "pissa"),
        ("balora", "balora-no-svd"),
    ]
    assert comparison_pairs(["pissa", "balora-no-consistency"]) == [("balora-no-consistency", "pissa")]
    assert isinstance(comparisons(_runs({"pissa": [1.0, 2.0], "balora": [1.0, 1.5]}), "nlg")[0], Comparison)


# ---------------------------------------------------------------------------------------------- settings
def test_flip_labels():
    labels = [i % 5 for i in range(20)]
    noisy, flipped = flip_labels(labels, 5, 0.3, seed=4)
    assert len(flipped) == 6 and flipped == sorted(set(flipped))
    assert all(noisy[i] != labels[i] for i in flipped)
    assert all(noisy[i] == labels[i] for i in range(20) if i not in flipped)
    assert all(0 <= y < 5 for y in noisy)
    assert flip_labels(labels, 5, 0.3, seed=4) == (noisy, flipped)
    assert flip_labels(labels, 5, 0.3, seed=5)[1] != flipped
    assert flip_labels(labels, 5, 0.0, seed=4) == (labels, [])


def test_ablations_switch_off_one_term_each():
    from balora_plugins import BALoRAConfig
    from balora_plugins.tools.demo.common import method_config

    cfg = BALoRAConfig.from_preset("iclr2026-nlg")
    assert method_config(cfg, METHODS["pissa"]) is None and method_config(cfg, METHODS["balora"]) is cfg
    for term in ("consistency", "diversity", "svd"):
        ablated = method_config(cfg, METHODS[f"balora-no-{term}"])
        for other in ("consistency", "diversity", "svd"):
            want = 0.0 if other == term else getattr(cfg, f"lambda_{other}")
            assert getattr(ablated, f"lambda_{other}") == want


def test_seeds_and_seed_list():
    s = resolve_settings(device="cpu")
    assert s.seed == [0, 1, 2] and s.seeds == 3 and s.methods == ["lora", "pissa", "balora"]
    assert resolve_settings(device="cpu", seeds=5).seed == [0, 1, 2, 3, 4]
    assert resolve_settings(device="cpu", seed="7,3").seed == [7, 3]
    assert resolve_settings(device="cpu", seed="7,3", seeds=2).seeds == 2
    with pytest.raises(DemoUsageError, match="--seeds 3 and --seed 7,3 disagree"):
        resolve_settings(device="cpu", seed="7,3", seeds=3)
    with pytest.raises(DemoUsageError, match="names a seed twice"):
        resolve_settings(device="cpu", seed="1,1")
    with pytest.raises(DemoUsageError, match="--label-noise applies to --task nlu only"):
        resolve_settings(device="cpu", label_noise=0.3)
    with pytest.raises(DemoUsageError, match="--forget-size applies to --task nlg only"):
        resolve_settings(task="nlu", device="cpu", forget_size=4)
    assert resolve_settings(task="nlu", device="cpu", label_noise="0.3").label_noise == 0.3


def test_every_setting_is_a_generated_cli_option():
    parser = cli.build_parser()
    demo = parser.parse_args(["demo"]).commands["demo"]
    dests = {a.dest for a in demo._actions if isinstance(a, argparse.Action)}
    names = {f.name for f in cli_fields()}
    assert names == {f for f in DemoSettings.__dataclass_fields__} and names <= dests
    args = parser.parse_args(
        ["demo", "--seed", "4,2", "--label-noise", "0.3", "--no-generate", "--methods", "pissa,balora-no-svd"]
    )
    assert args.seed == [4, 2] and args.label_noise == 0.3 and args.generate is False
    assert args.methods == ["pissa", "balora-no-svd"] and args.steps is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--label-noise", "1.5"], "argument --label-noise: 1.5 must lie in [0, 1)"),
        (["demo", "--seed", "0,x"], "argument --seed: 'x' is not an integer"),
        (["demo", "--seeds", "0"], "argument --seeds: 0 must be >= 1"),
        (["demo", "--interval", "wald"], "argument --interval: invalid choice: 'wald'"),
        (["demo", "--methods", "balora-no-lora"], "allowed are lora, pissa, balora, balora-no-consistency"),
    ],
)
def test_bad_options_are_usage_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "balora_demo").exists()
