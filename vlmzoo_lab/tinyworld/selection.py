"""Does a run find the object a question names? Accuracy on single-object questions by the number
of objects in the image, against what reading the right property of a random object would score.

A ``position``, ``fine`` or ``shade`` question names one object ("is the red circle light or
dark?") and needs two steps: select that object's visual token(s), then read the property there.
A model that reads perfectly but picks one of the image's ``n`` objects at random answers right
with probability ``1/n`` plus, for each other object, ``1/n`` if that object has the same answer;
this module calls that the **random-object reference**. Accuracy that follows the reference as
``n`` grows (about 67% at two objects and 44% at six on a three-way type) says the property is
read but the object is not found; accuracy near 100% at every ``n`` says both steps work; accuracy
at chance at every ``n`` says the property is not read.

``scripts/selection.py RUN [RUN ...]`` prints the table for runs' ``eval/predictions.jsonl``; the
tiny world's ``scenes.json`` (next to the run's eval data) says which objects each image holds.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from functools import lru_cache
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .scene import cell_name

#: Question types about one named object, and how to read their answer off a ``scenes.json`` object.
SINGLE_OBJECT_TYPES: dict[str, Any] = {
    "position": lambda o: cell_name(o["row"], o["col"]),
    "fine": lambda o: o["mark"],
    "shade": lambda o: o.get("shade"),
}


@dataclass(frozen=True)
class SelectionRow:
    """One question type at one object count: accuracy (%) and the random-object reference (%)."""

    question_type: str
    objects: int
    questions: int
    accuracy: float
    random_object: float


def random_object_reference(answer: str, objects: Sequence[Mapping[str, Any]], question_type: str) -> float:
    """Probability that the property of a uniformly chosen object of the image equals ``answer``."""
    read = SINGLE_OBJECT_TYPES[question_type]
    return sum(read(o) == answer for o in objects) / len(objects)


def selection_rows(predictions: Sequence[Mapping[str, Any]], eval_records: Sequence[Mapping[str, Any]],
                   scenes: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[SelectionRow]:
    """Rows for every single-object type in ``predictions`` (``id``, ``correct``, ``question_type``)
    by object count, plus one row per type with ``objects = 0`` for all counts together.

    ``eval_records``: the eval file's records (``id`` -> ``image``, ``answer``); ``scenes``: image
    path -> its objects (``scenes.json``'s ``eval`` part). A prediction whose record or image is
    missing raises ``KeyError`` naming it.
    """
    by_id = {r["id"]: r for r in eval_records}
    cells: dict[tuple[str, int], list[tuple[bool, float]]] = defaultdict(list)
    for p in predictions:
        qtype = p.get("question_type")
        if qtype not in SINGLE_OBJECT_TYPES:
            continue
        if p["id"] not in by_id:
            raise KeyError(f"Prediction {p['id']!r} has no record in the eval file.")
        record = by_id[p["id"]]
        if record["image"] not in scenes:
            raise KeyError(f"Eval record {p['id']!r}: image {record['image']!r} is not in scenes.json.")
        objects = scenes[record["image"]]
        entry = (bool(p["correct"]), random_object_reference(record["answer"], objects, qtype))
        cells[(qtype, len(objects))].append(entry)
        cells[(qtype, 0)].append(entry)
    rows = []
    for (qtype, n), entries in sorted(cells.items(), key=lambda kv: (list(SINGLE_OBJECT_TYPES).index(kv[0][0]), kv[0][1] or 99)):
        rows.append(SelectionRow(qtype, n, len(entries), 100 * sum(c for c, _ in entries) / len(entries),
                                 100 * sum(r for _, r in entries) / len(entries)))
    return rows


def run_files(run_dir: str | Path) -> tuple[Path, Path, Path]:
    """A run folder's ``eval/predictions.jsonl``, its eval data file and the world's ``scenes.json``
    (beside the eval data), from its ``resolved_config.yaml``; a missing one raises naming it."""
    run_dir = Path(run_dir)
    predictions = run_dir / "eval" / "predictions.jsonl"
    config = run_dir / "resolved_config.yaml"
    for path in (predictions, config):
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir}: no {path.relative_to(run_dir)} (an evaluated run folder is needed).")
    data = (yaml.safe_load(config.read_text()).get("eval") or {}).get("data")
    if not data:
        raise ValueError(f"{config}: eval.data is not set.")
    scenes = Path(data).parent / "scenes.json"
    if not scenes.is_file():
        raise FileNotFoundError(f"{scenes}: not found (the tiny world's scenes, beside {data}).")
    return predictions, Path(data), scenes


@lru_cache(maxsize=4)
def _world_file(path: Path, stamp: tuple[int, int]) -> Any:
    """A world JSON file, parsed once per version (``stamp``: mtime and size): a study's runs share
    one world's eval file and scenes (several MB), read only."""
    return json.loads(path.read_text())


def _read_world_file(path: Path) -> Any:
    stat = path.stat()
    return _world_file(path, (stat.st_mtime_ns, stat.st_size))


def run_rows(run_dir: str | Path) -> list[SelectionRow]:
    """:func:`selection_rows` of an evaluated run folder."""
    predictions_path, data, scenes_path = run_files(run_dir)
    with open(predictions_path) as f:
        predictions = [json.loads(line) for line in f if line.strip()]
    return selection_rows(predictions, _read_world_file(data), _read_world_file(scenes_path)["eval"])


def format_selection(runs: Mapping[str, Sequence[SelectionRow]]) -> str:
    """A markdown table: a row per (type, object count), the random-object reference, then one
    accuracy column per run (rows of runs on the same eval file line up)."""
    names = list(runs)
    first = runs[names[0]]
    acc = {name: {(r.question_type, r.objects): r.accuracy for r in rows} for name, rows in runs.items()}
    lines = ["| type | objects | questions | random object | " + " | ".join(names) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(names)]
    for r in first:
        key = (r.question_type, r.objects)
        cols = " | ".join(f"{acc[n][key]:.1f}" if key in acc[n] else "" for n in names)
        lines.append(f"| {r.question_type} | {r.objects or 'all'} | {r.questions} | {r.random_object:.1f} | {cols} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Accuracy of tiny-world runs on single-object questions (position, fine, shade) by the number "
        "of objects in the image, against the random-object reference: a model that reads the property but picks "
        "a random object.")
    parser.add_argument("runs", nargs="+", help="evaluated run folders (with eval/predictions.jsonl)")
    args = parser.parse_args(argv)
    print(format_selection({str(run): run_rows(run) for run in args.runs}))
    return 0
