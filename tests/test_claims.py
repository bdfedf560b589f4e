"""The claims table (vlmzoo_lab.study_claims) on hand-made runs: every verdict of the rule, the numbers,
missing runs, the spread of a declared extra (IGVA's layer weights), and the checks of configs/claims.yaml."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from vlmzoo_lab.study import RunRecord

REPO = Path(__file__).resolve().parent.parent


def _run(arch: str, seed: int, per_type: dict[str, float], layer_weights: dict | None = None) -> RunRecord:
    extras = {"layer_weights": {"title": "layer weights", "component": "w", "by_type": layer_weights}} if layer_weights else {}
    """A run with the given accuracies (0..1) per type; the other fields do not enter the claims."""
    return RunRecord(arch=arch, seed=seed, run_dir=Path(f"runs/{arch}-s{seed}"), reused=False, trained_stages=[],
                     accuracy=0.5, macro_accuracy=0.5, n_eval=10, per_type=per_type, blind_accuracy=None,
                     blind_per_type={}, params_total=1, params_trainable=1, params_strategy=1, visual_tokens=16,
                     train_time_s=1.0, latency_ms=None, extras=extras)


def _runs(arch: str, qtype: str, values: list[float]) -> list[RunRecord]:
    return [_run(arch, seed, {qtype: v / 100}) for seed, v in enumerate(values)]


def _claim(**fields):
    from vlmzoo_lab.study_claims import Claim

    base = dict(claim="c", methods=("m",), question_types=("fine",), negative_control="neg", positive_control="pos")
    return Claim(**{**base, **fields})


def _one_row(claim, runs) -> dict:
    from vlmzoo_lab.study_claims import claim_rows

    rows = claim_rows([claim], runs)
    assert len(rows) == 1
    return rows[0]


@pytest.mark.parametrize("method, verdict", [
    ([44.0, 46.0, 45.0], "reproduces"),            # +10 at noise 1 (the negative's std)
    ([38.0, 33.0, 43.0], "inconclusive"),          # +3 > 0 but within 2 x noise 5
    ([37.4, 37.5, 37.6], "inconclusive"),          # +2.5 beyond 2 x noise 1 but under 3 points
    ([33.0, 36.0, 34.5], "does not reproduce"),    # -0.5
])
def test_effect_rule_with_a_learnable_situation(method, verdict):
    runs = _runs("m", "fine", method) + _runs("neg", "fine", [34.0, 35.0, 36.0]) + _runs("pos", "fine", [90, 95, 100])
    row = _one_row(_claim(), runs)
    assert row["verdict"] == verdict and row["note"] == ""
    assert row["seeds"] == 3
    assert row["method_mean"] == pytest.approx(statistics.fmean(method))
    assert row["method_std"] == pytest.approx(statistics.stdev(method), abs=1e-4)
    assert (row["negative_mean"], row["negative_std"]) == (pytest.approx(35.0), pytest.approx(1.0))
    assert (row["positive_mean"], row["positive_std"]) == (pytest.approx(95.0), pytest.approx(5.0))
    assert row["effect"] == pytest.approx(statistics.fmean(method) - 35.0, abs=1e-4)
    assert row["noise"] == pytest.approx(max(statistics.stdev(method), 1.0), abs=1e-4)
    assert row["control_gap"] == pytest.approx(60.0)


def test_a_positive_control_under_25_points_makes_the_situation_not_learnable():
    runs = _runs("m", "shade", [60, 61, 62]) + _runs("neg", "shade", [47, 48, 49]) + _runs("pos", "shade", [70, 72, 74])
    row = _one_row(_claim(question_types=("shade",)), runs)
    assert row["control_gap"] == pytest.approx(24.0)
    assert row["verdict"] == "situation not learnable"
    assert "24.0 < 25 points" in row["note"] and "effect rule alone: reproduces" in row["note"]
    runs = runs[:6] + _runs("pos", "shade", [72, 73, 74])  # 25 points exactly: learnable
    assert _one_row(_claim(question_types=("shade",)), runs)["verdict"] == "reproduces"


def test_a_negative_control_within_25_points_of_100_leaves_no_headroom():
    """The same short gap is "no headroom" when not even 100% could beat the negative control by 25."""
    runs = _runs("m", "position", [99, 26, 100]) + _runs("neg", "position", [99.8, 26.2, 99.7])
    row = _one_row(_claim(question_types=("position",)), runs + _runs("pos", "position", [100, 100, 100]))
    assert row["negative_mean"] == pytest.approx(75.233, abs=1e-3) and row["control_gap"] == pytest.approx(24.767, abs=1e-3)
    assert row["verdict"] == "no headroom"
    assert "24.8 < 25 points" in row["note"] and "75.2 leaves less than that to 100" in row["note"]
    low = _runs("neg", "position", [70, 80, 74])  # mean 74.7: a perfect control would clear 25
    assert _one_row(_claim(question_types=("position",)), runs[:3] + low + _runs("pos", "position", [90, 92, 94]))[
        "verdict"] == "situation not learnable"


def test_missing_controls_and_seeds_are_marked_not_guessed():
    method, neg = _runs("m", "fine", [50, 52, 54]), _runs("neg", "fine", [30, 31, 32])
    absent = _claim(positive_control=None, missing_positive_control="an oracle mask")
    row = _one_row(absent, method + neg)
    assert row["verdict"] == "positive control missing" and row["positive_control"] == ""
    assert row["positive_mean"] is None and row["control_gap"] is None
    assert row["note"] == "none built: an oracle mask; effect rule alone: reproduces"

    row = _one_row(_claim(), method + neg)  # declared, not in this study
    assert row["verdict"] == "positive control not run" and row["positive_control"] == "pos"
    assert row["effect"] == pytest.approx(21.0)

    row = _one_row(_claim(), method + _runs("pos", "fine", [90, 91, 92]))
    assert row["verdict"] == "negative control not run" and row["effect"] is None and row["seeds_for_3pt"] is None

    row = _one_row(_claim(), method[:1] + neg[:1] + _runs("pos", "fine", [90]))
    assert row["verdict"] == "too few seeds" and row["seeds"] == 1 and row["seeds_for_3pt"] is None

    from vlmzoo_lab.study_claims import claim_rows

    assert claim_rows([_claim(methods=("never_run",))], neg) == []  # a method not in the study: no row
    # a type the study did not evaluate (e.g. --max-eval): no row either
    assert claim_rows([_claim(question_types=("count",))], method + neg) == []


def test_one_row_per_type_and_method_in_claim_order():
    from vlmzoo_lab.study_claims import claim_rows

    runs = []
    for arch, base in (("a", 60), ("b", 50), ("neg", 40), ("pos", 90)):
        runs += [_run(arch, s, {"colour": (base + s) / 100, "position": (base - 10 + s) / 100}) for s in range(3)]
    rows = claim_rows([_claim(methods=("a", "b"), question_types=("colour", "position"))], runs)
    assert [(r["question_type"], r["method"]) for r in rows] == [
        ("colour", "a"), ("colour", "b"), ("position", "a"), ("position", "b")]
    assert [r["effect"] for r in rows] == pytest.approx([20, 10, 20, 10])


def test_seeds_for_a_3_point_effect():
    """Two-sample z-test, two-sided 5%, power 80%: n = ceil(2 (1.95996 + 0.84162)^2 sigma^2 / 9)."""
    from vlmzoo_lab.study_claims import seeds_to_resolve

    z = 1.959964 + 0.841621
    for sigma in (0.5, 1.7, 2.6, 11.9):
        assert seeds_to_resolve(sigma) == max(2, math.ceil(2 * z**2 * sigma**2 / 9)), sigma
    assert seeds_to_resolve(11.9) == 247 and seeds_to_resolve(1.7) == 6 and seeds_to_resolve(0.0) == 2
    assert seeds_to_resolve(2.6, two_sample=False) == math.ceil(z**2 * 2.6**2 / 9) == 6

    runs = _runs("m", "fine", [40, 45, 50]) + _runs("neg", "fine", [30, 31, 32]) + _runs("pos", "fine", [90, 91, 92])
    assert _one_row(_claim(), runs)["seeds_for_3pt"] == seeds_to_resolve(5.0) == 44


def test_spread_of_a_declared_extra_row():
    """The largest spread across question types ("all" excluded) of a group's weight, per seed, in points."""
    from vlmzoo_lab.study_claims import Claim

    def weights(spread: float) -> dict:
        return {"colour": {"mean": [0.2, 0.8]}, "shade": {"mean": [0.2 + spread, 0.8 - spread / 2]},
                "fine": {"mean": [0.2 - spread / 4, 0.8]}, "all": {"mean": [0.0, 1.0]}}

    spreads = [0.10, 0.12, 0.14]  # w1: max - min = 1.25 x spread; w2: 0.5 x spread
    runs = [_run("igva", s, {"shade": 0.5}, weights(v)) for s, v in enumerate(spreads)] + _runs("llava", "shade", [50, 50, 50])
    row = _one_row(Claim(claim="w", methods=("igva",), measure="spread", extra="layer_weights"), runs)
    want = [125 * v for v in spreads]
    assert row["question_type"] == "across_types" and row["negative_control"] == "" and row["positive_control"] == ""
    assert row["measure"] == "spread:layer_weights"
    assert row["method_mean"] == pytest.approx(statistics.fmean(want)) and row["effect"] == row["method_mean"]
    assert row["noise"] == pytest.approx(statistics.stdev(want), abs=1e-4)
    assert row["verdict"] == "reproduces"  # 15 points >> 2 x 2.5
    # a spread is never negative: under 3 points it does not reproduce (not "inconclusive")
    flat = [_run("igva", s, {"shade": 0.5}, weights(v)) for s, v in enumerate([0.002, 0.001, 0.003])]
    row = _one_row(Claim(claim="w", methods=("igva",), measure="spread", extra="layer_weights"), flat)
    assert row["method_mean"] == pytest.approx(0.25) and row["verdict"] == "does not reproduce"
    from vlmzoo_lab.study_claims import claim_rows

    one_type = [_run("igva", s, {"colour": 0.5}, {"colour": {"mean": [0.3, 0.7]}, "all": {"mean": [0.3, 0.7]}})
                for s in range(3)]
    assert claim_rows([Claim(claim="w", methods=("igva",), measure="spread", extra="layer_weights")], one_type) == []
    noisy = [_run("igva", s, {"shade": 0.5}, weights(v)) for s, v in enumerate([0.0, 0.04, 0.08])]
    assert _one_row(Claim(claim="w", methods=("igva",), measure="spread", extra="layer_weights"), noisy)["verdict"] == "inconclusive"


def test_csv_and_markdown(tmp_path):
    import csv

    from vlmzoo_lab.study_claims import COLUMNS, claim_rows, claims_markdown, write_claims_csv

    runs = _runs("m", "fine", [40, 45, 50]) + _runs("neg", "fine", [30, 31, 32])
    rows = claim_rows([_claim()], runs)
    path = write_claims_csv(rows, tmp_path / "claims.csv")
    (read,) = list(csv.DictReader(open(path)))
    assert list(read) == COLUMNS
    assert read["positive_mean"] == "" and float(read["effect"]) == pytest.approx(14.0)
    assert read["verdict"] == "positive control not run"
    table = claims_markdown(rows)
    assert "| c | fine | `m` 45.0 ± 5.0 | `neg` 31.0 ± 1.0 | `pos` - | +14.0 | 5.0 | 44 | positive control not run |" in table
    write_claims_csv([], tmp_path / "empty.csv")
    assert (tmp_path / "empty.csv").read_text().strip() == ",".join(COLUMNS)


def test_the_shipped_claims_file():
    """configs/claims.yaml holds the issue's rows; every entry has a config and the `claims` preset runs them all."""
    from vlmzoo_lab.study import StudySpec, config_path, preset_archs
    from vlmzoo_lab.study_claims import load_claims

    claims = {c.claim: c for c in load_claims()}
    dp = claims["TG-DP reads detail"]
    assert (dp.question_types, dp.methods, dp.negative_control, dp.positive_control) == (
        ("fine",), ("tg_llava", "tg_llava:tiny_dp_only"), "llava", "crop_tokens:tiny_marked")
    fom = claims["TG-FOM selects the named object"]
    assert (fom.question_types, fom.methods, fom.negative_control, fom.positive_control) == (
        ("position",), ("tg_llava:tiny_fom_only",), "llava", "tg_llava:tiny_fom_oracle")
    assert fom.missing_positive_control is None
    shade = claims["early layers hold low-level evidence"]
    assert (shade.question_types, shade.methods, shade.negative_control, shade.positive_control) == (
        ("shade",), ("igva", "dense_connector"), "llava", "llava:tiny_shade_layer")
    budget = claims["instruction-aware pooling under a budget"]
    assert (budget.question_types, budget.methods, budget.negative_control, budget.positive_control) == (
        ("colour", "position"), ("ta_llava",), "resampler", "llava")
    weights = claims["IGVA's instruction-dependent weights"]
    assert (weights.measure, weights.extra) == ("spread", "layer_weights")

    entries = {e for c in claims.values() for e in c.entries()}
    assert entries == set(preset_archs("claims"))
    controls = set(preset_archs("controls"))
    assert {c.negative_control for c in claims.values() if c.negative_control} <= controls
    assert {c.positive_control for c in claims.values() if c.positive_control} <= controls
    for entry in entries:
        assert config_path(StudySpec(), entry).is_file(), entry


@pytest.mark.parametrize("text, match", [
    ("claims: {}", r"top-level 'claims' list"),
    ("claims:\n  - {claim: x, methods: [a], question_types: [fine], negative_control: b, positiv_control: c}",
     r"'positiv_control' in .*claims\[0\]\. Did you mean 'positive_control'"),
    ("claims:\n  - {claim: x, methods: [a], question_types: [fine], negative_control: b}",
     r"claims\[0\] \('x'\): without a positive_control, 'missing_positive_control'"),
    ("claims:\n  - {claim: x, methods: [a], question_types: [fine], positive_control: b}",
     r"'negative_control' is required"),
    ("claims:\n  - {claim: x, methods: [a], negative_control: b, positive_control: c}", r"'question_types'"),
    ("claims:\n  - {claim: w, methods: [igva], measure: spred}", r"measure must be one of accuracy, spread"),
    ("claims:\n  - {claim: w, methods: [igva], measure: spread}", r"names the strategy extra it spreads: 'extra'"),
    ("claims:\n  - {claim: w, methods: [igva], measure: spread, extra: layer_weights, negative_control: llava}",
     r"takes no negative_control"),
    ("claims:\n  - {claim: x, methods: [a], question_types: [fine], negative_control: b, positive_control: c, extra: w}",
     r"'extra' belongs to a spread claim only"),
    ("claims:\n  - {claim: x, methods: a, question_types: [fine], negative_control: b, positive_control: c}",
     r"claims\[0\]\.methods must be a list"),
])
def test_a_malformed_claims_file_names_the_entry_and_key(tmp_path, text, match):
    from vlmzoo_lab.study_claims import load_claims

    path = tmp_path / "claims.yaml"
    path.write_text(text)
    with pytest.raises((ValueError, TypeError, KeyError), match=match) as err:
        load_claims(path)
    assert str(path) in str(err.value)
