"""The selection table (:mod:`vlmzoo_lab.tinyworld.selection`): accuracy on single-object questions
by object count against the random-object reference, from hand-made predictions and from a run
folder's files."""

from __future__ import annotations

import json

import pytest
import yaml

from vlmzoo_lab.tinyworld.selection import (
    format_selection,
    random_object_reference,
    run_rows,
    selection_rows,
)

SCENES = {
    "eval/0.png": [  # two objects
        {"colour": "red", "shape": "circle", "mark": "vertical", "row": 0, "col": 0, "shade": "dark"},
        {"colour": "blue", "shape": "square", "mark": "vertical", "row": 1, "col": 2, "shade": "light"},
    ],
    "eval/1.png": [  # three objects
        {"colour": "red", "shape": "circle", "mark": "checkered", "row": 0, "col": 0, "shade": "dark"},
        {"colour": "blue", "shape": "square", "mark": "vertical", "row": 1, "col": 2, "shade": "dark"},
        {"colour": "green", "shape": "cross", "mark": "horizontal", "row": 3, "col": 3, "shade": "light"},
    ],
}
RECORDS = [
    {"id": "p0", "image": "eval/0.png", "answer": "a1", "question_type": "position"},
    {"id": "p1", "image": "eval/1.png", "answer": "c2", "question_type": "position"},
    {"id": "f0", "image": "eval/0.png", "answer": "vertical", "question_type": "fine"},
    {"id": "f1", "image": "eval/1.png", "answer": "checkered", "question_type": "fine"},
    {"id": "s1", "image": "eval/1.png", "answer": "dark", "question_type": "shade"},
    {"id": "c0", "image": "eval/0.png", "answer": "red", "question_type": "colour"},
]


def predictions(correct: dict[str, bool]) -> list[dict]:
    return [{"id": r["id"], "question_type": r["question_type"], "correct": correct.get(r["id"], False)} for r in RECORDS]


def test_the_reference_counts_the_objects_with_the_same_answer():
    # a cell is unique; a mark or shade may be shared, and then a wrong pick can still be right
    assert random_object_reference("a1", SCENES["eval/0.png"], "position") == pytest.approx(1 / 2)
    assert random_object_reference("vertical", SCENES["eval/0.png"], "fine") == pytest.approx(1.0)
    assert random_object_reference("checkered", SCENES["eval/1.png"], "fine") == pytest.approx(1 / 3)
    assert random_object_reference("dark", SCENES["eval/1.png"], "shade") == pytest.approx(2 / 3)


def test_rows_by_type_and_object_count():
    rows = selection_rows(predictions({"p0": True, "f1": True}), RECORDS, SCENES)
    table = {(r.question_type, r.objects): r for r in rows}
    # only the single-object types, each by count and overall (objects = 0), in type order
    assert [(r.question_type, r.objects) for r in rows] == [
        ("position", 2), ("position", 3), ("position", 0), ("fine", 2), ("fine", 3), ("fine", 0), ("shade", 3), ("shade", 0)]
    assert table["position", 2].accuracy == 100.0 and table["position", 3].accuracy == 0.0
    assert table["position", 0].accuracy == 50.0 and table["position", 0].questions == 2
    assert table["position", 0].random_object == pytest.approx(100 * (1 / 2 + 1 / 3) / 2)
    assert table["fine", 2].random_object == pytest.approx(100.0)
    assert table["fine", 3].accuracy == 100.0
    assert table["shade", 0].random_object == pytest.approx(100 * 2 / 3)


def test_a_prediction_without_its_record_or_scene_is_named():
    with pytest.raises(KeyError, match="'p9'"):
        selection_rows([{"id": "p9", "question_type": "position", "correct": True}], RECORDS, SCENES)
    with pytest.raises(KeyError, match="eval/0.png"):
        selection_rows(predictions({}), RECORDS, {"eval/1.png": SCENES["eval/1.png"]})


def write_run(tmp_path, correct: dict[str, bool]):
    data = tmp_path / "world" / "data"
    data.mkdir(parents=True)
    (data / "eval.json").write_text(json.dumps(RECORDS))
    (data / "scenes.json").write_text(json.dumps({"train": {}, "eval": SCENES}))
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions(correct)))
    (run / "resolved_config.yaml").write_text(yaml.safe_dump({"eval": {"data": str(data / "eval.json")}}))
    return run


def test_a_run_folder_gives_the_same_rows_and_one_column_per_run(tmp_path):
    run = write_run(tmp_path, {"p0": True, "f1": True})
    rows = run_rows(run)
    assert rows == selection_rows(predictions({"p0": True, "f1": True}), RECORDS, SCENES)
    table = format_selection({"a": rows, "b": selection_rows(predictions({}), RECORDS, SCENES)})
    lines = table.splitlines()
    assert lines[0].endswith("| a | b |") and len(lines) == 2 + len(rows)
    assert "| position | all | 2 | 41.7 | 50.0 | 0.0 |" in lines


def test_a_run_folder_without_predictions_or_scenes_is_named(tmp_path):
    run = write_run(tmp_path, {})
    (tmp_path / "world" / "data" / "scenes.json").unlink()
    with pytest.raises(FileNotFoundError, match="scenes.json"):
        run_rows(run)
    (run / "eval" / "predictions.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="predictions.jsonl"):
        run_rows(run)
