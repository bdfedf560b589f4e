"""Evaluation: answer normalisation and exact match, POPE statistics, the blind control, the eval
command line on a saved toy-world model, and batched (left-padded) vs per-sample generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_training import make_toy_world, toy_config_dict
from vlmzoo.evaluation import (
    BlindControl,
    EvalRecord,
    accuracy_table,
    generate_answers,
    load_eval_records,
    normalize_answer,
    pope_stats,
    pope_yes_no,
)


def record(answer: str, qtype: str = "all", question: str = "q", split: str | None = None, rid: str = "r") -> EvalRecord:
    return EvalRecord(id=rid, messages=[{"role": "user", "content": question}], images=[], answer=answer,
                      question_type=qtype, extra={"pope_split": split} if split else {})


def write_json(path: Path, records: list[dict]) -> str:
    path.write_text(json.dumps(records))
    return str(path)


# ---- normalisation and exact match ---------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Red Square.", "red square"),
        ("  two  ", "2"),
        ("It's a DOG!", "its dog"),
        ("an apple, a pear", "apple pear"),
        ("three-legged", "3 legged"),
        ("twelve", "12"),
        ("thirteen", "thirteen"),
        ("Yes.", "yes"),
        ("A", ""),
        ("b3 , c4", "b3 c4"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_accuracy_table_by_hand():
    records = [
        record("red", "colour"), record("two", "count"), record("Blue.", "colour"),
        record("3", "count"), record("the green one", "colour"),
    ]
    predictions = ["Red", "2", "a blue", "three dogs", "green"]
    # colour: red ok, "a blue" = "blue" ok, "green" != "green one" -> 2/3; count: "2" ok, "3 dogs" != "3" -> 1/2
    table = accuracy_table(records, predictions)
    assert table["n"] == 5
    assert table["accuracy"] == pytest.approx(3 / 5)
    assert table["macro_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert table["per_type"] == {"colour": {"accuracy": pytest.approx(2 / 3), "n": 3},
                                 "count": {"accuracy": pytest.approx(1 / 2), "n": 2}}


# ---- POPE ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prediction, expected",
    [("No, there is not.", "no"), ("Yes, there is a cat.", "yes"), ("There is no dog", "no"), ("Not really", "no"),
     ("Nothing is there", "yes"), ("Yes. No.", "yes"), ("I think so", "yes"), ("no,", "no")],
)
def test_pope_yes_no(prediction, expected):
    assert pope_yes_no(prediction) == expected


def test_pope_stats_by_hand():
    cases = [  # (gold, prediction, split) -> outcome
        ("yes", "Yes, there is.", "random"),    # TP
        ("yes", "No.", "random"),               # FN
        ("no", "There is no cat", "random"),    # TN
        ("no", "Yes. No.", "random"),           # FP (first sentence only)
        ("no", "Nothing is there", "popular"),  # FP ("nothing" is not "no")
        ("yes", "I see it", "popular"),         # TP
        ("no", "Not at all", "popular"),        # TN
        ("Yes.", "yes, certainly", "popular"),  # TP (gold normalised)
        ("red", "no", "random"),                # not a yes/no question: left out
    ]
    records = [record(g, split=s) for g, _, s in cases]
    stats = pope_stats(records, [p for _, p, _ in cases])
    assert set(stats) == {"all", "random", "popular"}
    # all: TP 3, FP 2, TN 2, FN 1
    assert stats["all"] == pytest.approx({"accuracy": 5 / 8, "precision": 3 / 5, "recall": 3 / 4,
                                          "f1": 2 / 3, "yes_ratio": 5 / 8, "n": 8})
    # random: TP 1, FP 1, TN 1, FN 1
    assert stats["random"] == pytest.approx({"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5,
                                             "yes_ratio": 0.5, "n": 4})
    # popular: TP 2, FP 1, TN 1, FN 0
    assert stats["popular"] == pytest.approx({"accuracy": 3 / 4, "precision": 2 / 3, "recall": 1.0, "f1": 0.8,
                                              "yes_ratio": 3 / 4, "n": 4})
    # no yes/no question at all: no POPE entry
    assert pope_stats([record("red")], ["no"]) == {}


# ---- blind control -------------------------------------------------------------------------------
def test_blind_control_rules(tmp_path):
    def rec(turns, image=True, **fields):
        conv = []
        for k, (q, a) in enumerate(turns):
            conv += [{"from": "human", "value": ("<image>\n" if image and k == 0 else "") + q}, {"from": "gpt", "value": a}]
        return {"image": "x.png", "conversations": conv, **fields} if image else {"conversations": conv, **fields}

    train = [
        # "what colour is the ball?": red 2, blue 1 -> red by text ...
        rec([("what colour is the ball?", "red")], question_type="colour"),
        rec([("What colour is the   ball?", "red")], question_type="colour"),
        rec([("what colour is the ball?", "blue")], question_type="colour"),
        # ... while the colour type as a whole says blue (4 vs 2).
        *[rec([("what colour is the sky?", "blue")], question_type="colour") for _ in range(3)],
        # one type per turn
        rec([("how many cats?", "2"), ("is there a dog?", "no")], question_types=["count", "exist"]),
        *[rec([("how many dogs?", "3")], question_type="count") for _ in range(2)],
        # untyped, text-only: the type comes from the eval set ("is there a cat?" is an exist question there)
        *[rec([("is there a cat?", "yes")], image=False) for _ in range(2)],
    ]
    train_path = write_json(tmp_path / "train.json", train)
    evals = [
        ("e1", "<image>\nWhat colour is the BALL?", "colour", "red", "text"),
        ("e2", "<image>\nwhat colour is the car?", "colour", "blue", "type"),
        ("e3", "<image>\nhow many cats?", "count", "2", "text"),
        ("e4", "<image>\nhow many birds?", "count", "3", "type"),
        ("e5", "<image>\nis there a bird?", "exist", "yes", "type"),  # exist: yes 2 (inferred) vs no 1
        ("e6", "<image>\nis there a cat?", "exist", "yes", "text"),
        ("e7", "<image>\nwhat shape is it?", "shape", "blue", "overall"),  # overall: blue 4 beats the rest
    ]
    eval_path = write_json(tmp_path / "eval.json", [
        {"id": i, "image": "x.png", "question_type": t, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "?"}]}
        for i, q, t, _, _ in evals])
    records = load_eval_records(eval_path)
    control = BlindControl(train_path, records)
    assert [control.answer(r) for r in records] == [(a, rule) for _, _, _, a, rule in evals]
    assert control.skipped == 0

    # A malformed training record is counted and named in a warning, not silently dropped.
    bad = write_json(tmp_path / "train_bad.json", [*train, {"id": "broken", "conversations": [{"from": "alien", "value": "x"}]}])
    control = BlindControl(bad, records)
    assert control.skipped == 1
    assert [control.answer(r) for r in records] == [(a, rule) for _, _, _, a, rule in evals]


# ---- a saved toy-world model ---------------------------------------------------------------------
# Questions of different lengths, so a batch needs padding.
QUESTIONS = [
    ("is there a red square ?", "exist", "yes"),
    ("what colour is the square ?", "colour", "red"),
    ("is there a square ?", "exist", "no"),
    ("what colour is the red square ? is there a blue square ?", "colour", "blue"),
    ("square ?", "exist", "yes"),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A toy-world model saved with its processor, whose answers depend on the question."""
    from vlmzoo.build import build_model_and_processor
    from vlmzoo.config import run_config_from_dict

    root = tmp_path_factory.mktemp("eval_world")
    world = make_toy_world(root, n_train=8, n_eval=4)
    cfg = run_config_from_dict(toy_config_dict(world, root / "run"))
    torch.manual_seed(0)
    model, processor = build_model_and_processor(cfg)
    # A fresh tiny LLM answers everything alike; large random weights make answers input-dependent.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith("vision_tower."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    images = sorted(p.relative_to(world["images"]).as_posix() for p in Path(world["images"]).glob("*/*.png"))
    evals = [
        {"id": f"q{i}", "image": images[i % len(images)], "question_type": t, "pope_split": "random" if t == "exist" else None,
         "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
        for i, (q, t, a) in enumerate(QUESTIONS * 2)
    ]
    data = write_json(root / "eval_varied.json", evals)
    return {"world": world, "model_dir": model_dir, "data": data, "images": world["images"], "root": root}


def test_batched_generation_equals_per_sample(saved):
    from PIL import Image

    from vlmzoo.evaluation import _image_first, load_for_eval

    model, processor = load_for_eval(saved["model_dir"])
    records = load_eval_records(saved["data"])
    # The prompts differ in length, so a whole batch is left-padded.
    blank = [[Image.new("RGB", (32, 32))] for _ in records]
    mask = processor([_image_first(r) for r in records], images=blank, add_generation_prompt=True,
                     padding_side="left")["attention_mask"]
    assert len(set(mask.sum(1).tolist())) >= 3 and (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all()

    single = generate_answers(model, processor, records, saved["images"], batch_size=1, max_new_tokens=4)
    batched = generate_answers(model, processor, records, saved["images"], batch_size=len(records), max_new_tokens=4)
    in_threes = generate_answers(model, processor, records, saved["images"], batch_size=3, max_new_tokens=4)
    assert batched == single == in_threes
    # The comparison means something: answers are non-empty and differ between questions.
    assert sum(map(bool, single)) >= len(single) - 2 and len(set(single)) >= 4


def test_eval_cli_writes_metrics_and_predictions(saved, tmp_path):
    from vlmzoo.evaluation import load_for_eval, main

    out = tmp_path / "eval"
    train_data = saved["world"]["stage2"]
    rc = main(["--model", str(saved["model_dir"]), "--data", saved["data"], "--images", saved["images"],
               "--train-data", train_data, "--output-dir", str(out), "eval.batch_size=4", "eval.max_new_tokens=3"])
    assert rc == 0
    metrics = json.loads((out / "eval_metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    records = load_eval_records(saved["data"])

    # One row per record, in order, with the record's fields.
    assert [(r["id"], r["question_type"], r["answer"]) for r in rows] == [(r.id, r.question_type, r.answer) for r in records]
    assert [r["question"] for r in rows] == [q for q, _, _ in QUESTIONS * 2]
    assert [r.get("pope_split") for r in rows] == ["random" if t == "exist" else None for _, t, _ in QUESTIONS * 2]
    # The predictions are the model's greedy answers (same settings, computed one by one here).
    model, processor = load_for_eval(saved["model_dir"])
    expected = generate_answers(model, processor, records, saved["images"], batch_size=1, max_new_tokens=3)
    assert [r["prediction"] for r in rows] == expected
    assert [r["correct"] for r in rows] == [normalize_answer(p) == normalize_answer(r.answer) for p, r in zip(expected, records)]

    # Metrics: overall, per type, POPE and blind control, consistent with the rows.
    assert metrics["n"] == len(records) == 10
    assert metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 10)
    for qtype in ("colour", "exist"):
        typed = [r for r in rows if r["question_type"] == qtype]
        assert metrics["per_type"][qtype] == {"n": len(typed), "accuracy": pytest.approx(sum(r["correct"] for r in typed) / len(typed))}
    assert metrics["pope"]["all"]["n"] == 6 and set(metrics["pope"]) == {"all", "random"}
    assert metrics["generation"] == {**metrics["generation"], "batch_size": 4, "max_new_tokens": 3, "template": "vicuna_v1"}
    assert metrics["model"] == str(Path(saved["model_dir"]).resolve())

    blind = metrics["blind"]
    assert blind["source"] == str(Path(train_data).resolve())
    control = BlindControl(train_data, records)
    assert [(r["blind_prediction"], r["blind_rule"]) for r in rows] == [control.answer(r) for r in records]
    assert blind["accuracy"] == pytest.approx(
        sum(normalize_answer(r["blind_prediction"]) == normalize_answer(r["answer"]) for r in rows) / 10)
    assert sum(blind["rules_used"].values()) == 10
    # The toy training set asks "what colour is the square ?" (text rule) but never "square ?" (type rule).
    assert rows[1]["blind_rule"] == "text" and rows[4]["blind_rule"] == "type"
    assert set(blind["per_type"]) == {"colour", "exist"}
