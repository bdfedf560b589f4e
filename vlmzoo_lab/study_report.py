"""The comparison study's outputs: results.csv, results.md (mean ± std over seeds) and the plots
(accuracy, training loss, and each declared strategy extra per question type, e.g. IGVA's layer
weights: :attr:`vlmzoo.GuidanceStrategy.extra_outputs`).

Rows come from :class:`vlmzoo_lab.study.RunRecord` objects; :data:`CSV_DOC` documents the CSV columns.
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .study_claims import claim_rows, claims_markdown, write_claims_csv
from .tinyworld.selection import SelectionRow, run_rows

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .study import RunRecord, StudySpec
    from .study_claims import Claim

CSV_DOC = {
    "kind": "run (one training run), mean or std (over the strategy's seeds)",
    "arch": "strategy (config folder name)",
    "seed": "the run's seed; for mean/std rows the seeds, ';'-separated",
    "n_seeds": "runs aggregated (1 for a run row)",
    "acc_<type>": "exact-match accuracy on questions of that type, 0..1",
    "accuracy": "accuracy over all eval questions, 0..1",
    "macro_accuracy": "mean of the per-type accuracies, 0..1",
    "blind_accuracy": "the blind control's overall accuracy (most frequent training answer), 0..1",
    "blind_<type>": "the blind control's accuracy on that type, 0..1",
    "n_eval": "eval questions scored",
    "params_total": "all parameters of the model",
    "params_trainable": "parameters trained in the last stage",
    "params_strategy": "parameters outside the vision tower / text encoder / LLM (what the strategy adds)",
    "visual_tokens": "LLM input tokens per image",
    "train_time_s": "sum of the stages' training wall time, seconds",
    "latency_ms": "median time of one greedy answer (batch 1, eval.max_new_tokens tokens), ms",
    "<extra>": "one column per extra a strategy declares (extra_outputs, e.g. layer_weights): its mean per "
               "component, ';'-separated, all questions; empty for strategies without it",
    "reused": "1 if the run was found finished and nothing was trained or evaluated again",
    "run_dir": "the run folder",
}


def question_types(runs: Sequence[RunRecord]) -> list[str]:
    return sorted({t for r in runs for t in r.per_type})


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def run_row(r: RunRecord, types: Sequence[str], extra_keys: Sequence[str] = ()) -> dict[str, Any]:
    row: dict[str, Any] = {"kind": "run", "arch": r.arch, "seed": r.seed, "n_seeds": 1}
    row.update({f"acc_{t}": r.per_type.get(t) for t in types})
    row.update(accuracy=r.accuracy, macro_accuracy=r.macro_accuracy, blind_accuracy=r.blind_accuracy)
    row.update({f"blind_{t}": r.blind_per_type.get(t) for t in types})
    row.update(n_eval=r.n_eval, params_total=r.params_total, params_trainable=r.params_trainable,
               params_strategy=r.params_strategy, visual_tokens=r.visual_tokens, train_time_s=r.train_time_s,
               latency_ms=r.latency_ms, reused=int(r.reused), run_dir=str(r.run_dir))
    for key in extra_keys:
        overall = ((r.extras.get(key) or {}).get("by_type") or {}).get("all")
        row[key] = ";".join(f"{w:.4f}" for w in overall["mean"]) if overall else ""
    return row


def extra_keys_of(runs: Sequence[RunRecord]) -> list[str]:
    """The declared extras any run reports, in first-seen order (one CSV column each)."""
    return list(dict.fromkeys(k for r in runs for k in r.extras))


def aggregate_rows(runs: Sequence[RunRecord], types: Sequence[str], extra_keys: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per strategy (in study order): a ``mean`` and a ``std`` row over its seeds."""
    rows = []
    for arch in dict.fromkeys(r.arch for r in runs):
        mine = [run_row(r, types, extra_keys) for r in runs if r.arch == arch]
        mean: dict[str, Any] = {"kind": "mean", "arch": arch, "seed": ";".join(str(r["seed"]) for r in mine),
                                "n_seeds": len(mine)}
        std = {**mean, "kind": "std"}
        for key, value in mine[0].items():
            if key in mean or key in ("reused", "run_dir", *extra_keys) or not (value is None or isinstance(value, (int, float))):
                continue
            mean[key], std[key] = _mean_std([m[key] for m in mine])
        mean["reused"] = std["reused"] = int(all(m["reused"] for m in mine))
        for key in ("run_dir", *extra_keys):
            mean[key] = std[key] = ""
        rows += [mean, std]
    return rows


def _fmt(mean: float | None, std: float | None, scale: float = 100.0, digits: int = 1, with_std: bool = True) -> str:
    if mean is None:
        return "-"
    text = f"{scale * mean:.{digits}f}"
    return f"{text} ± {scale * std:.{digits}f}" if with_std and std is not None else text


def _count(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def markdown_table(runs: Sequence[RunRecord]) -> str:
    """Strategy rows: accuracy per type, overall, blind control (%, mean ± std over seeds),
    parameters, visual tokens, training time, latency; a last row: the blind control per type."""
    types = question_types(runs)
    agg = aggregate_rows(runs, types)
    header = ["strategy", "seeds", *types, "overall", "macro", "blind", "params", "trainable",
              "strategy params", "visual tokens", "train time (s)", "latency (ms)"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * (len(header) - 2)]
    for mean, std in zip(agg[::2], agg[1::2]):
        cells = [mean["arch"], str(mean["n_seeds"])]
        cells += [_fmt(mean[f"acc_{t}"], std[f"acc_{t}"]) for t in types]
        cells += [_fmt(mean[k], std[k]) for k in ("accuracy", "macro_accuracy", "blind_accuracy")]
        cells += [_count(mean[k]) for k in ("params_total", "params_trainable", "params_strategy")]
        cells += ["-" if mean["visual_tokens"] is None else f"{mean['visual_tokens']:.0f}"]
        cells += [_fmt(mean["train_time_s"], std["train_time_s"], 1.0), _fmt(mean["latency_ms"], std["latency_ms"], 1.0)]
        lines.append("| " + " | ".join(cells) + " |")
    blind = [_fmt(*_mean_std([r.blind_per_type.get(t) for r in runs]), with_std=False) for t in types]
    overall = _fmt(*_mean_std([r.blind_accuracy for r in runs]), with_std=False)
    lines.append("| *blind control* | | " + " | ".join(blind) + f" | {overall} | | | | | | | | |")
    return "\n".join(lines)


def selection_table(runs: Sequence[RunRecord]) -> str:
    """The study's single-object types per strategy (:mod:`vlmzoo_lab.tinyworld.selection`):
    ``fewest / most objects / all``, mean over seeds, first row the random-object reference; ``""``
    when a run's eval has no tiny-world scenes (another data set) or no single-object type, or when
    a run's predictions do not match its world's files (logged as a warning naming the run)."""
    per_run: dict[str, list[list[SelectionRow]]] = {}
    for r in runs:
        try:
            per_run.setdefault(r.arch, []).append(run_rows(r.run_dir))
        except FileNotFoundError:
            return ""
        except (ValueError, KeyError) as exc:
            logger.warning("results.md has no 'Finding the named object' section: run %s: %s", r.run_dir, exc)
            return ""
    first = next(iter(per_run.values()))[0]
    types = list(dict.fromkeys(row.question_type for row in first))
    if not types:
        return ""
    counts = {t: sorted(row.objects for row in first if row.question_type == t and row.objects) for t in types}

    def cells(rows_per_seed: list[list[SelectionRow]], field: str) -> list[str]:
        out = []
        for t in types:
            values = []
            for n in (counts[t][0], counts[t][-1], 0):
                got = [getattr(row, field) for rows in rows_per_seed for row in rows if (row.question_type, row.objects) == (t, n)]
                values.append(f"{statistics.fmean(got):.1f}" if got else "-")
            out.append(" / ".join(values))
        return out

    head = [f"`{t}` ({counts[t][0]} / {counts[t][-1]} objects / all)" for t in types]
    lines = ["| strategy | " + " | ".join(head) + " |", "|---|" + "---:|" * len(types),
             "| *random-object reference* | " + " | ".join(cells([first], "random_object")) + " |"]
    for arch, rows_per_seed in per_run.items():
        lines.append(f"| {arch} | " + " | ".join(cells(rows_per_seed, "accuracy")) + " |")
    return "\n".join(lines)


def _short(override: str, limit: int = 60) -> str:
    return override if len(override) <= limit else override[: limit - 3] + "..."


def write_outputs(spec: "StudySpec", runs: Sequence["RunRecord"], claims: Sequence["Claim"] = ()) -> tuple[str, dict[str, Path]]:
    """results.csv, claims.csv (of ``claims``), results.md, accuracy.png and loss.png in ``spec.out``
    -> (markdown table, files)."""
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    types = question_types(runs)
    keys = extra_keys_of(runs)
    rows = [run_row(r, types, keys) for r in runs] + aggregate_rows(runs, types, keys)
    csv_path = out / "results.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(runs)
    seeds = ", ".join(str(s) for s in spec.seeds)
    intro = [
        "# Strategy comparison", "",
        f"Strategies trained on the same data and steps, evaluated on the same {runs[0].n_eval} questions; "
        f"seeds {seeds}. Accuracy in % (exact match), mean ± std over seeds; *blind* answers each question "
        "with the most frequent training answer. Parameters: all / trained in the last stage / outside the "
        "vision tower, text encoder and LLM. Latency: median of one greedy answer at batch 1.",
        f"Configs: `{spec.config_dir or 'configs'}/<arch>/{spec.scale}.yaml`"
        + (f"; overrides: `{' '.join(_short(o) for o in spec.overrides)}`" if spec.overrides else "") + ".", "", "",
    ]
    files = {"results.csv": csv_path}
    claims_table = claim_rows(claims, runs)
    if claims:
        files["claims.csv"] = write_claims_csv(claims_table, out / "claims.csv")
    files.update(plot_accuracy(runs, out / "accuracy.png"))
    files.update(plot_loss(runs, out / "loss.png"))
    body = table + "\n\n![accuracy](accuracy.png)\n\n![loss](loss.png)\n"
    for key in keys:
        files.update(plot_extra(runs, key, out / f"{key}.png"))
        title = extra_title(runs, key)
        body += (f"\n## {title[:1].upper() + title[1:]} per question type\n\nMean of each component of `{key}` "
                 "over the eval questions of each type (mean over seeds).\n\n" + extra_table(runs, key)
                 + f"\n\n![{title}]({key}.png)\n")
    selection = selection_table(runs)
    if selection:
        body += ("\n## Finding the named object\n\nAccuracy on the questions about one named object with the "
                 "fewest and the most objects in the image, and overall (mean over seeds), beside the random-object "
                 "reference: what reading the property right but picking a random object of the image scores. "
                 "Accuracy that follows the reference means the property is read but the object is not found "
                 "(docs/controls.md; scripts/selection.py splits one run by every object count).\n\n" + selection + "\n")
    if claims_table:
        body += ("\n## Claims\n\nEach claim's method against its negative control (the strategy lacking the "
                 "information) and its positive control (handed it directly), in points on the type (mean ± std over "
                 "seeds); the rule and the columns are in docs/controls.md. The same rows: claims.csv.\n\n"
                 + claims_markdown(claims_table) + "\n")
    md_path = out / "results.md"
    md_path.write_text("\n".join(intro) + body)
    return table, {"results.md": md_path, **files}


def extra_title(runs: Sequence[RunRecord], key: str) -> str:
    """The declared title of extra ``key`` (its key if no run names one)."""
    return next((r.extras[key].get("title") for r in runs if r.extras.get(key, {}).get("title")), key)


def extra_component(runs: Sequence[RunRecord], key: str) -> str:
    return next((r.extras[key].get("component") for r in runs if r.extras.get(key, {}).get("component")), "v")


def mean_extra(runs: Sequence[RunRecord], key: str) -> dict[str, dict[str, list[float]]]:
    """``{arch: {question type: mean of extra ``key`` over seeds}}`` for the strategies reporting it."""
    out: dict[str, dict[str, list[float]]] = {}
    for arch in dict.fromkeys(r.arch for r in runs):
        mine = [r.extras[key]["by_type"] for r in runs if r.arch == arch and (r.extras.get(key) or {}).get("by_type")]
        if not mine:
            continue
        types = [t for t in mine[0] if all(t in m for m in mine)]
        out[arch] = {t: [statistics.fmean(vals) for vals in zip(*(m[t]["mean"] for m in mine))] for t in types}
    return out


def extra_table(runs: Sequence[RunRecord], key: str) -> str:
    """A markdown table of extra ``key``: one row per (strategy, question type), one column per component."""
    values = mean_extra(runs, key)
    if not values:
        return ""
    k = max(len(v) for per_type in values.values() for v in per_type.values())
    c = extra_component(runs, key)
    lines = ["| strategy | question type | " + " | ".join(f"{c}{i + 1}" for i in range(k)) + " |",
             "|---|---|" + "---:|" * k]
    for arch, per_type in values.items():
        for t, w in per_type.items():
            lines.append(f"| {arch} | {t} | " + " | ".join(f"{x:.3f}" for x in w) + " |")
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(runs: Sequence[RunRecord], path: Path) -> dict[str, Path]:
    """Grouped bars: question types (and overall) on x, one bar per strategy, std error bars; the
    blind control as a black tick over each group."""
    plt = _pyplot()
    types = [*question_types(runs), "overall"]
    archs = list(dict.fromkeys(r.arch for r in runs))
    width = 0.8 / len(archs)
    # ~0.3 in per bar, between 6 and 14 in wide: six strategies x seven groups stay readable in a page.
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.3 * len(types) * len(archs))), 4.5), dpi=100)
    for i, arch in enumerate(archs):
        mine = [r for r in runs if r.arch == arch]
        stats = [_mean_std([r.accuracy if t == "overall" else r.per_type.get(t) for r in mine]) for t in types]
        xs = [k + (i - (len(archs) - 1) / 2) * width for k in range(len(types))]
        ax.bar(xs, [100 * (m or 0) for m, _ in stats], width, yerr=[100 * (s or 0) for _, s in stats],
               capsize=3, label=arch)
    for k, t in enumerate(types):
        b, _ = _mean_std([r.blind_accuracy if t == "overall" else r.blind_per_type.get(t) for r in runs])
        if b is not None:
            ax.hlines(100 * b, k - 0.42, k + 0.42, colors="black", linestyles="--", linewidth=1,
                      label="blind control" if k == 0 else None)
    ax.set_xticks(range(len(types)), types)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Accuracy per question type (mean ± std over seeds)")
    ax.legend(fontsize=8, ncol=min(7, len(archs) + 1), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"accuracy.png": path}


def plot_extra(runs: Sequence[RunRecord], key: str, path: Path) -> dict[str, Path]:
    """One panel per strategy reporting extra ``key``: question types on x, one bar per component."""
    values = mean_extra(runs, key)
    if not values:
        return {}
    title, c = extra_title(runs, key), extra_component(runs, key)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(values), figsize=(5.5 * len(values), 3.6), dpi=100, squeeze=False)
    for ax, (arch, per_type) in zip(axes[0], values.items()):
        types = list(per_type)
        k = len(per_type[types[0]])
        width = 0.8 / k
        for i in range(k):
            xs = [j + (i - (k - 1) / 2) * width for j in range(len(types))]
            ax.bar(xs, [per_type[t][i] for t in types], width, label=f"{c}{i + 1}")
        ax.set_xticks(range(len(types)), types, rotation=30)
        ax.set_ylabel(f"mean {title}")
        ax.set_title(f"{arch}: {title} per question type")
        ax.legend(fontsize=8, ncol=k)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {path.name: path}


def plot_loss(runs: Sequence[RunRecord], path: Path) -> dict[str, Path]:
    """Training loss vs. global step (stages laid end to end), one line per strategy (mean over
    seeds at each logged step), dotted vertical lines at the stage boundaries."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.0), dpi=100)
    boundaries: set[int] = set()
    for arch in dict.fromkeys(r.arch for r in runs):
        by_step: dict[int, list[float]] = {}
        for r in runs:
            if r.arch == arch:
                for step, loss in zip(r.loss_steps, r.losses):
                    by_step.setdefault(step, []).append(loss)
                boundaries.update(r.stage_ends[:-1])
        ends = next(r.stage_ends for r in runs if r.arch == arch)
        xs: list[float] = []
        ys: list[float] = []
        for step in sorted(by_step):
            if xs and any(xs[-1] <= b < step for b in ends):  # no line across a stage boundary
                xs.append(math.nan)
                ys.append(math.nan)
            xs.append(step)
            ys.append(statistics.fmean(by_step[step]))
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=arch)
    for b in sorted(boundaries):
        ax.axvline(b, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("global step (stages end to end; dotted: stage boundary)")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss (mean over seeds)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"loss.png": path}
