"""The study's claims table (``claims.csv``): each claim's method, negative and positive control side
by side on each question type, the effect, the seed noise and a verdict.

The claims are data (``configs/claims.yaml``, read by :func:`load_claims`); the rows are computed
from a study's :class:`vlmzoo_lab.study.RunRecord` objects by :func:`claim_rows`. Accuracies are in
points (0..100), mean and sample standard deviation over a strategy's seeds.

The verdict rule (docs/results.md, docs/controls.md), in order:

1. a control that was not run in this study, or fewer than :data:`MIN_SEEDS` seeds: no verdict;
2. a claim without a positive control: ``positive control missing``;
3. a positive control that does not beat the negative control by :data:`MIN_CONTROL_GAP` points on
   the type: ``no headroom`` when the negative control is itself within that many points of 100
   (no configuration could beat it by that much: the baseline already does what the claim is
   about), else ``situation not learnable`` (the world or the recipe does not let even the
   configuration handed the information show it); either way the method's result says nothing;
4. else the effect rule (:func:`effect_verdict`): ``reproduces`` if the effect exceeds both
   :data:`NOISE_MULTIPLE` x the seed noise and :data:`MIN_EFFECT` points; ``inconclusive`` if it
   is positive but within that; else ``does not reproduce``. For the spread of a declared strategy
   extra (measure ``spread``, e.g. of IGVA's layer weights; no control; the effect is the spread
   itself, never negative) ``inconclusive`` needs a spread above :data:`MIN_EFFECT`.

Where 2-3 override the effect rule, the ``note`` column says what the effect rule alone gives.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import yaml

from vlmzoo.config import CONFIGS_DIR
from vlmzoo.utils import build_dataclass

if TYPE_CHECKING:
    from .study import RunRecord

#: An effect must exceed this many points ...
MIN_EFFECT = 3.0
#: ... and this multiple of the seed noise to reproduce.
NOISE_MULTIPLE = 2.0
#: The positive control must beat the negative control by this many points on the type.
MIN_CONTROL_GAP = 25.0
#: Seeds needed for a noise estimate (a standard deviation).
MIN_SEEDS = 2
#: seeds_for_3pt: the effect to resolve (points), the test's two-sided level and its power.
RESOLVE_EFFECT = 3.0
ALPHA = 0.05
POWER = 0.8

MEASURES = ("accuracy", "spread")

CLAIMS_CSV_DOC = {
    "claim": "the claim (configs/claims.yaml)",
    "question_type": "the eval question type; across_types for a spread",
    "measure": "accuracy (points, 0..100) or spread:<extra> (points of the extra's components x 100, e.g. "
               "spread:layer_weights)",
    "method": "the strategy whose claim it is (study entry: arch or arch:stem)",
    "negative_control": "the strategy lacking the information (empty: none)",
    "positive_control": "the configuration handed the information directly (empty: none built or none asked)",
    "seeds": "seeds behind the row (the fewest of its strategies)",
    "method_mean / method_std": "the method's measure, mean and std over seeds",
    "negative_mean / negative_std": "the same for the negative control",
    "positive_mean / positive_std": "the same for the positive control",
    "control_gap": "positive_mean - negative_mean (must be >= 25 for a verdict on the method)",
    "effect": "method_mean - negative_mean (a spread: method_mean)",
    "noise": "the larger seed std of the method and its negative control (a spread: the method's)",
    "seeds_for_3pt": "seeds per strategy for a 3-point effect at this noise: "
                     "ceil(2 (z_0.975 + z_0.8)^2 noise^2 / 3^2), one-sample (no factor 2) for a spread; at least 2",
    "verdict": "reproduces / inconclusive / does not reproduce / no headroom / situation not learnable / "
               "positive control missing / ... not run / too few seeds",
    "note": "what the effect rule alone gives where the verdict overrides it; missing runs",
}
COLUMNS = ["claim", "question_type", "measure", "method", "negative_control", "positive_control", "seeds",
           "method_mean", "method_std", "negative_mean", "negative_std", "positive_mean", "positive_std",
           "control_gap", "effect", "noise", "seeds_for_3pt", "verdict", "note"]
ACROSS_TYPES = "across_types"


@dataclass(frozen=True)
class Claim:
    """One entry of ``configs/claims.yaml`` (field meanings: the file's header)."""

    claim: str
    methods: tuple[str, ...]
    measure: str = "accuracy"
    extra: str | None = None
    question_types: tuple[str, ...] = ()
    negative_control: str | None = None
    positive_control: str | None = None
    missing_positive_control: str | None = None

    def entries(self) -> list[str]:
        """Every study entry the claim reads: methods, then the controls."""
        return [*self.methods, *(e for e in (self.negative_control, self.positive_control) if e)]


def default_claims_path() -> Path:
    return CONFIGS_DIR / "claims.yaml"


def load_claims(path: str | os.PathLike | None = None) -> list[Claim]:
    """The claims of ``path`` (default ``configs/claims.yaml``); a malformed entry is an error naming
    the file, the entry and the key."""
    path = Path(path) if path else default_claims_path()
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("claims"), list):
        raise ValueError(f"{path}: expected a top-level 'claims' list.")
    claims = []
    for i, raw in enumerate(data["claims"]):
        where = f"{path}: claims[{i}]"
        claim = build_dataclass(Claim, raw, where)
        problem = _claim_problem(claim)
        if problem:
            raise ValueError(f"{where} ({claim.claim!r}): {problem}")
        claims.append(claim)
    return claims


def _claim_problem(c: Claim) -> str | None:
    if c.measure not in MEASURES:
        return f"measure must be one of {', '.join(MEASURES)}, got {c.measure!r}."
    if not c.methods:
        return "'methods' must name at least one strategy."
    if c.measure == "spread":
        if not c.extra:
            return "a spread claim names the strategy extra it spreads: 'extra' (e.g. layer_weights)."
        extra = [k for k in ("question_types", "negative_control", "positive_control") if getattr(c, k)]
        return f"a spread claim takes no {', '.join(extra)}." if extra else None
    if c.extra:
        return "'extra' belongs to a spread claim only."
    if not c.question_types:
        return "'question_types' must name at least one question type."
    if not c.negative_control:
        return "'negative_control' is required for an accuracy claim."
    if not c.positive_control and not c.missing_positive_control:
        return "without a positive_control, 'missing_positive_control' must say what it would be."
    return None


# ---- statistics ----------------------------------------------------------------------------------
def effect_verdict(effect: float, noise: float, signed: bool = True) -> str:
    """The effect rule: ``reproduces`` if ``effect > NOISE_MULTIPLE * noise`` and ``> MIN_EFFECT``;
    ``inconclusive`` if positive but within that; else ``does not reproduce``. An unsigned effect
    (a spread, never negative) is ``inconclusive`` only above ``MIN_EFFECT``."""
    if effect > NOISE_MULTIPLE * noise and effect > MIN_EFFECT:
        return "reproduces"
    return "inconclusive" if effect > (0 if signed else MIN_EFFECT) else "does not reproduce"


def seeds_to_resolve(noise: float, two_sample: bool = True, effect: float = RESOLVE_EFFECT) -> int:
    """Seeds per strategy for a test at level ALPHA (two-sided) with power POWER to find ``effect``
    points at seed std ``noise``: ``ceil(k (z_{1-ALPHA/2} + z_POWER)^2 noise^2 / effect^2)``, k = 2 for
    a difference of two means, 1 for one mean against 0; at least :data:`MIN_SEEDS`."""
    z = statistics.NormalDist().inv_cdf(1 - ALPHA / 2) + statistics.NormalDist().inv_cdf(POWER)
    k = 2 if two_sample else 1
    return max(MIN_SEEDS, math.ceil(k * z**2 * noise**2 / effect**2))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def spread(by_type: dict[str, Any]) -> float | None:
    """The largest spread (max - min over question types, ``"all"`` excluded) of a component's mean,
    in points (x 100), of one run's extra ``{type: {"mean": [K]}}``; ``None`` under two types."""
    per_type = [v["mean"] for t, v in by_type.items() if t != "all"]
    if len(per_type) < 2:
        return None
    return 100 * max(max(col) - min(col) for col in zip(*per_type))


# ---- rows ----------------------------------------------------------------------------------------
def _values(runs: Sequence[RunRecord], entry: str | None, c: Claim, qtype: str) -> list[float]:
    """The measure of each of ``entry``'s runs (one per seed; empty if it was not run)."""
    if not entry:
        return []
    mine = [r for r in runs if r.arch == entry]
    if c.measure == "spread":
        tables = [(r.extras.get(c.extra) or {}).get("by_type") for r in mine]
        spreads = [spread(t) for t in tables if t]
        return [v for v in spreads if v is not None]
    return [100 * r.per_type[qtype] for r in mine if qtype in r.per_type]


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def claim_rows(claims: Sequence[Claim], runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One row per claim, question type and method that the study ran (see the module doc)."""
    rows = []
    for c in claims:
        qtypes = c.question_types if c.measure == "accuracy" else (ACROSS_TYPES,)
        for qtype in qtypes:
            for method in c.methods:
                m = _values(runs, method, c, qtype)
                if m:
                    rows.append(_row(c, qtype, method, m, _values(runs, c.negative_control, c, qtype),
                                     _values(runs, c.positive_control, c, qtype)))
    return rows


def _row(c: Claim, qtype: str, method: str, m: list[float], neg: list[float], pos: list[float]) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(claim=c.claim, question_type=qtype, measure=f"spread:{c.extra}" if c.measure == "spread" else c.measure,
               method=method,
               negative_control=c.negative_control or "", positive_control=c.positive_control or "", note="")
    row["method_mean"], row["method_std"] = _mean_std(m)
    if neg:
        row["negative_mean"], row["negative_std"] = _mean_std(neg)
    if pos:
        row["positive_mean"], row["positive_std"] = _mean_std(pos)
    seeds = min(len(v) for v in (m, neg, pos) if v)
    row["seeds"] = seeds
    two_sample = True
    if c.measure == "spread":
        row["effect"], row["noise"] = row["method_mean"], row["method_std"]
        two_sample = False
    elif neg:
        row["effect"] = row["method_mean"] - row["negative_mean"]
        row["noise"] = max(row["method_std"], row["negative_std"])
    if pos and neg:
        row["control_gap"] = row["positive_mean"] - row["negative_mean"]
    if c.measure == "accuracy" and not neg:
        row["verdict"] = "negative control not run"
        row["note"] = f"{c.negative_control} is not in this study"
    elif seeds < MIN_SEEDS:
        row["verdict"] = "too few seeds"
        row["note"] = f"{seeds} seed(s): no noise estimate; the rule needs {MIN_SEEDS}"
    else:
        row["seeds_for_3pt"] = seeds_to_resolve(row["noise"], two_sample)
        rule = effect_verdict(row["effect"], row["noise"], signed=two_sample)
        row["verdict"] = rule
        if c.measure == "accuracy":
            override = None
            if not c.positive_control:
                override = ("positive control missing", f"none built: {c.missing_positive_control}")
            elif not pos:
                override = ("positive control not run", f"{c.positive_control} is not in this study")
            elif row["control_gap"] < MIN_CONTROL_GAP:
                gap = f"the positive control beats the negative by {row['control_gap']:.1f} < {MIN_CONTROL_GAP:g} points"
                if 100.0 - row["negative_mean"] < MIN_CONTROL_GAP:
                    override = ("no headroom", f"{gap}, and the negative control's {row['negative_mean']:.1f} leaves "
                                f"less than that to 100")
                else:
                    override = ("situation not learnable", gap)
            if override:
                row["verdict"] = override[0]
                row["note"] = f"{override[1]}; effect rule alone: {rule}"
    for key in ("method_mean", "method_std", "negative_mean", "negative_std", "positive_mean", "positive_std",
                "control_gap", "effect", "noise"):
        row[key] = _round(row[key])
    return row


# ---- outputs -------------------------------------------------------------------------------------
def write_claims_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """``rows`` as CSV with :data:`COLUMNS` (a header alone if the study ran no claim's method)."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return path


def claims_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The claims table as markdown: method, controls (mean ± std), effect, noise, verdict."""

    def cell(row: dict[str, Any], arm: str) -> str:
        mean = row[f"{arm}_mean"]
        return "-" if mean is None else f"{mean:.1f} ± {row[f'{arm}_std']:.1f}"

    def num(x: Any, fmt: str = "{:+.1f}") -> str:
        return "-" if x is None else fmt.format(x)

    lines = ["| claim | type | method | negative control | positive control | effect | noise | seeds for 3 pts | verdict |",
             "|---|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        neg = f"`{r['negative_control']}` {cell(r, 'negative')}" if r["negative_control"] else "-"
        pos = f"`{r['positive_control']}` {cell(r, 'positive')}" if r["positive_control"] else "-"
        lines.append(f"| {r['claim']} | {r['question_type']} | `{r['method']}` {cell(r, 'method')} | {neg} | {pos} | "
                     f"{num(r['effect'])} | {num(r['noise'], '{:.1f}')} | {num(r['seeds_for_3pt'], '{}')} | {r['verdict']} |")
    return "\n".join(lines)
