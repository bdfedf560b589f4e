"""Evaluation: batched greedy answers, exact-match scoring per question type, POPE stats, a blind control.

* Predictions: each record's conversation up to its last assistant turn is the prompt (the
  processor's template, generation prompt added, left padding); greedy decoding. With a high-res
  image folder and a strategy with a high-res factor, the images' high-res versions go in as
  ``pixel_values_hr``, as in training.
* Scoring: normalised exact match (:func:`normalize_answer`) against the last assistant turn,
  overall, macro-averaged and per question type (the record's ``question_type`` field).
* POPE: over records whose gold answer is yes/no, the prediction is mapped to yes/no as the POPE
  reference script does (``no``/``not`` among its words -> no) and accuracy, precision, recall,
  F1 and the yes-ratio are reported, overall and per ``pope_split`` when records name one.
* Blind control: for each question, the most frequent training answer to the same question text;
  else the most frequent training answer to questions of the same type; else the most frequent
  training answer. It measures what is answerable without looking at the image.

Outputs: ``eval_metrics.json`` and ``predictions.jsonl`` (one line per record).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import string
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .build import torch_dtype
from .config import add_config_arguments, config_from_args, prepare_run_files
from .data import LlavaDataError, iter_json_records, normalize_record
from .data.checks import ImagePathError, open_rgb_image, resolve_image_path
from .data.llava_json import _prepare_messages
from .data.templates import DEFAULT_IMAGE_TOKEN
from .modeling import VLMForConditionalGeneration
from .processing import VLMProcessor
from .strategy import view_key, view_name
from .utils import setup_logging

logger = logging.getLogger(__name__)

METRICS_FILE = "eval_metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
UNTYPED = "all"

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split()
)}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation.replace(chr(39), ''))}]")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation to spaces, articles dropped, number words to digits, spaces collapsed."""
    words = _PUNCT.sub(" ", text.lower().replace("'", "")).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


def question_text(content: str) -> str:
    """A user turn's question without the image placeholder, whitespace collapsed, lower case."""
    return " ".join(content.replace(DEFAULT_IMAGE_TOKEN, " ").split()).lower()


def pope_yes_no(prediction: str) -> str:
    """POPE's rule: first sentence; ``no`` or ``not`` among its words means no, anything else yes."""
    first = prediction.split(".")[0].replace(",", "")
    words = first.lower().split()
    return "no" if ("no" in words or "not" in words) else "yes"


# ---- records -------------------------------------------------------------------------------------
@dataclass
class EvalRecord:
    """One question: the prompt messages, its image(s), the gold answer and bookkeeping fields."""

    id: str
    messages: list[dict[str, str]]
    images: list[str]
    answer: str
    question_type: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        return question_text(self.messages[-1]["content"])


def load_eval_records(path: str | os.PathLike, question_type_key: str = "question_type", max_samples: int | None = None) -> list[EvalRecord]:
    """LLaVA-format records ending in an assistant turn (the gold answer); bad records raise."""
    records = []
    for index, raw in iter_json_records(path):
        if max_samples is not None and len(records) >= max_samples:
            break
        try:
            rec = normalize_record(raw, index)
        except ValueError as exc:
            raise LlavaDataError(os.fspath(path), str(exc), getattr(exc, "record_id", None), index) from None
        messages = rec["messages"]
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise LlavaDataError(os.fspath(path), "an eval record must end with the gold answer (a gpt turn).", rec["id"], index)
        extra = {k: raw[k] for k in ("pope_split",) if raw.get(k) is not None}
        records.append(EvalRecord(
            id=rec["id"], messages=messages[:-1], images=rec["images"], answer=messages[-1]["content"],
            question_type=str(raw.get(question_type_key) or UNTYPED), extra=extra,
        ))
    return records


# ---- blind control -------------------------------------------------------------------------------
class BlindControl:
    """Most frequent training answer per question text, per question type, and overall.

    Training turns get a type from the record (``question_type``: one type, or ``question_types``:
    one per question turn) when it has one; otherwise from the eval set, when the same question
    text appears there with a type.
    """

    def __init__(self, train_path: str | os.PathLike, eval_records: Sequence[EvalRecord], question_type_key: str = "question_type") -> None:
        eval_types = {r.question: r.question_type for r in eval_records}
        self.by_text: dict[str, Counter] = defaultdict(Counter)
        self.by_type: dict[str, Counter] = defaultdict(Counter)
        self.overall: Counter = Counter()
        self.skipped = 0  # malformed records (the training loader reports them in detail)
        for index, raw in iter_json_records(train_path):
            try:
                messages = normalize_record(raw, index)["messages"]
            except ValueError as exc:
                self.skipped += 1
                logger.warning("Blind control: ignoring record %d of %s: %s", index, train_path, exc)
                continue
            types = raw.get(f"{question_type_key}s") or raw.get(question_type_key)
            pairs = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(len(messages) - 1)
                     if messages[i]["role"] == "user" and messages[i + 1]["role"] == "assistant"]
            for k, (question, answer) in enumerate(pairs):
                text = question_text(question)
                qtype = types[k] if isinstance(types, list) and k < len(types) else types if isinstance(types, str) else eval_types.get(text)
                self.by_text[text][answer] += 1
                if qtype:
                    self.by_type[str(qtype)][answer] += 1
                self.overall[answer] += 1
        if not self.overall:
            raise ValueError(f"Blind control: no question/answer pairs in {train_path}.")

    def answer(self, record: EvalRecord) -> tuple[str, str]:
        """-> (answer, rule used: ``text``, ``type`` or ``overall``)."""
        for rule, table in (("text", self.by_text.get(record.question)), ("type", self.by_type.get(record.question_type))):
            if table:
                return table.most_common(1)[0][0], rule
        return self.overall.most_common(1)[0][0], "overall"


# ---- generation ----------------------------------------------------------------------------------
@torch.inference_mode()
def generate_answers(
    model,
    processor,
    records: Sequence[EvalRecord],
    images_dir: str | os.PathLike,
    batch_size: int = 64,
    max_new_tokens: int = 16,
    high_res_dir: str | os.PathLike | None = None,
    allow_absolute_paths: bool = False,
) -> list[str]:
    """Greedy answers for ``records``, in batches with left padding.

    ``high_res_dir``: the images' high-res versions (same relative paths), read only for a crop
    view of the processor's input spec (:meth:`VLMProcessor.view_folders`); a missing file raises,
    naming it and the record. ``allow_absolute_paths``: see :func:`record_images`."""
    folders = processor.view_folders(images_dir, high_res_dir)
    answers: list[str] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images, high_res = zip(*(record_views(rec, folders, allow_absolute_paths) for rec in chunk))
        texts = generate_texts(model, processor, [_image_first(r) for r in chunk], images, max_new_tokens=max_new_tokens,
                               high_res_images=None if high_res[0] is None else high_res)
        answers += [a.strip() for a in texts]
    return answers


def generation_batch(
    model,
    processor,
    conversations: Sequence[Sequence[dict[str, str]]],
    images: Sequence[Sequence[Any]],
    high_res_images: Sequence[Sequence[Any]] | None = None,
) -> dict[str, torch.Tensor]:
    """Prompts (generation prompt added, left padding) on the model's device, pixels in its vision dtype.

    ``images[i]`` holds sample i's PIL images, one per ``<image>`` placeholder; ``high_res_images[i]``
    the same images at high resolution (-> ``pixel_values_hr`` when the processor's input spec has
    a crop view).
    """
    batch = processor(list(conversations), images=list(images), add_generation_prompt=True, padding_side="left",
                      high_res_images=None if high_res_images is None else list(high_res_images))
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    for key in map(view_key, processor.input_spec.image_views):
        if key in batch:
            batch[key] = batch[key].to(model.vision_dtype)
    return batch


@torch.inference_mode()
def greedy_generate(model, processor, batch: dict[str, torch.Tensor], max_new_tokens: int, **generate_kwargs: Any) -> torch.Tensor:
    """Decoding (KV cache; greedy unless ``generate_kwargs`` ask otherwise) of a
    :func:`generation_batch` -> the new tokens ``(B, <= max_new_tokens)``."""
    model.eval()
    tokenizer = processor.tokenizer
    kwargs: dict[str, Any] = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    kwargs.update(generate_kwargs)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, **kwargs)
    return out[:, batch["input_ids"].shape[1]:]


def generate_texts(
    model,
    processor,
    conversations: Sequence[Sequence[dict[str, str]]],
    images: Sequence[Sequence[Any]],
    max_new_tokens: int = 16,
    high_res_images: Sequence[Sequence[Any]] | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """One left-padded batch: each conversation (ending in a user turn) -> its decoded continuation
    (not stripped); see :func:`generation_batch` and :func:`greedy_generate`."""
    batch = generation_batch(model, processor, conversations, images, high_res_images)
    new_tokens = greedy_generate(model, processor, batch, max_new_tokens, **generate_kwargs)
    return processor.batch_decode(new_tokens, skip_special_tokens=True)


def image_first_messages(messages: Sequence[dict[str, str]], num_images: int, image_token: str = DEFAULT_IMAGE_TOKEN) -> list[dict[str, str]]:
    """LLaVA-1.5's prompt layout, as in training: a single image goes first in its turn."""
    return _prepare_messages(list(messages), num_images, image_token, move_image_to_front=True)


def record_views(record: EvalRecord, folders: dict[int, str], allow_absolute: bool = False) -> tuple[list[Any], list[Any] | None]:
    """The record's images for each view of ``folders`` (:meth:`VLMProcessor.view_folders`):
    ``(base images, high-res images or None)``, as :func:`generation_batch` takes them."""
    views = {scale: record_images(record, folder, view_name(scale), allow_absolute) for scale, folder in folders.items()}
    return views[1], next((v for scale, v in views.items() if scale > 1), None)


def record_images(record: EvalRecord, images_dir: str | os.PathLike, what: str = "image",
                  allow_absolute: bool = False) -> list[Any]:
    """The record's images (paths relative to ``images_dir``) as RGB PIL images, in order; a
    missing file raises ``FileNotFoundError`` naming it (``what``) and the record, a path that
    leaves ``images_dir`` a ``ValueError`` (:func:`vlmzoo.data.checks.resolve_image_path`;
    ``allow_absolute``: ``data.allow_absolute_image_paths``)."""
    loaded = []
    for rel in record.images:
        try:
            path = resolve_image_path(images_dir, rel, allow_absolute)
        except ImagePathError as exc:
            raise ImagePathError(f"Eval record {record.id!r}: {what} {exc}") from None
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Eval record {record.id!r}: {what} file not found: {path}")
        loaded.append(open_rgb_image(path))
    return loaded


def _image_first(record: EvalRecord) -> list[dict[str, str]]:
    return image_first_messages(record.messages, len(record.images))


# ---- scoring -------------------------------------------------------------------------------------
def accuracy_table(records: Sequence[EvalRecord], predictions: Sequence[str]) -> dict[str, Any]:
    """Overall / macro / per-type normalised exact match."""
    per_type: dict[str, list[bool]] = defaultdict(list)
    for rec, pred in zip(records, predictions):
        per_type[rec.question_type].append(normalize_answer(pred) == normalize_answer(rec.answer))
    hits = [h for v in per_type.values() for h in v]
    types = {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(per_type.items())}
    return {
        "accuracy": sum(hits) / max(len(hits), 1),
        "macro_accuracy": sum(t["accuracy"] for t in types.values()) / max(len(types), 1),
        "n": len(hits),
        "per_type": types,
    }


def pope_stats(records: Sequence[EvalRecord], predictions: Sequence[str]) -> dict[str, dict[str, float]]:
    """POPE metrics over yes/no questions: ``all`` and one entry per ``pope_split`` present."""
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for rec, pred in zip(records, predictions):
        gold = normalize_answer(rec.answer)
        if gold in ("yes", "no"):
            pair = (gold, pope_yes_no(pred))
            groups["all"].append(pair)
            if rec.extra.get("pope_split"):
                groups[rec.extra["pope_split"]].append(pair)
    return {name: _pope(pairs) for name, pairs in groups.items()}


def _pope(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    pairs = list(pairs)
    tp = sum(g == "yes" and p == "yes" for g, p in pairs)
    fp = sum(g == "no" and p == "yes" for g, p in pairs)
    tn = sum(g == "no" and p == "no" for g, p in pairs)
    fn = sum(g == "yes" and p == "no" for g, p in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(pairs), "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": (tp + fp) / len(pairs), "n": len(pairs),
    }


# ---- whole evaluation ----------------------------------------------------------------------------
def evaluate_model(
    model,
    processor,
    data: str | os.PathLike,
    images: str | os.PathLike | None = None,
    *,
    high_res_images: str | os.PathLike | None = None,
    train_data: str | os.PathLike | None = None,
    question_type_key: str = "question_type",
    batch_size: int = 64,
    max_new_tokens: int = 16,
    max_samples: int | None = None,
    out_dir: str | os.PathLike | None = None,
    meta: dict[str, Any] | None = None,
    allow_absolute_paths: bool = False,
) -> dict[str, Any]:
    """Answer every record of ``data``, score, compare with the blind control; write the files to ``out_dir``.

    ``high_res_images``: the same images at high resolution (see :func:`generate_answers`);
    ``allow_absolute_paths``: see :func:`record_images`.
    ``meta`` entries (e.g. the model's path) are copied into the metrics."""
    images = os.fspath(images) if images else os.path.dirname(os.path.abspath(data))
    records = load_eval_records(data, question_type_key, max_samples)
    start = time.perf_counter()
    folders = processor.view_folders(images, high_res_images)
    predictions = generate_answers(model, processor, records, images, batch_size, max_new_tokens,
                                   high_res_dir=high_res_images, allow_absolute_paths=allow_absolute_paths)
    runtime = time.perf_counter() - start
    metrics: dict[str, Any] = {**(meta or {}), "data": os.path.abspath(data), **accuracy_table(records, predictions)}
    pope = pope_stats(records, predictions)
    if pope:
        metrics["pope"] = pope
    blind_answers: list[tuple[str, str]] = []
    if train_data:
        control = BlindControl(train_data, records, question_type_key)
        blind_answers = [control.answer(r) for r in records]
        blind = accuracy_table(records, [a for a, _ in blind_answers])
        blind["source"] = os.path.abspath(train_data)
        blind["rules_used"] = dict(Counter(rule for _, rule in blind_answers))
        blind["skipped_train_records"] = control.skipped
        metrics["blind"] = blind
    metrics["generation"] = {"runtime_s": round(runtime, 2), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                             "template": processor.template.name}
    for scale, folder in folders.items():
        if scale > 1:
            metrics["generation"]["high_res_images"] = os.path.abspath(folder)
    if out_dir is not None:
        write_eval_outputs(out_dir, metrics, records, predictions, blind_answers)
    return metrics


def write_eval_outputs(out_dir, metrics, records, predictions, blind_answers) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    with open(out / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
        for i, (rec, pred) in enumerate(zip(records, predictions)):
            row = {
                "id": rec.id, "question_type": rec.question_type, "question": rec.question, "answer": rec.answer,
                "prediction": pred, "correct": normalize_answer(pred) == normalize_answer(rec.answer), **rec.extra,
            }
            if blind_answers:
                row["blind_prediction"], row["blind_rule"] = blind_answers[i]
            f.write(json.dumps(row) + "\n")


def require_model_folder(path: str | os.PathLike) -> None:
    """A saved vlmzoo model is a local folder (its processor is read from there too); anything else is
    a ``FileNotFoundError`` naming it, not transformers' attempt to read the path as a hub repo id."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such folder (give a saved model, e.g. <run>/<stage>/final)")


def load_for_eval(model_dir: str | os.PathLike, template: str | None = None, dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None):
    """A saved model (eval mode) + processor (with another template if asked), on ``device``
    (default: the GPU when there is one)."""
    require_model_folder(model_dir)
    model = VLMForConditionalGeneration.from_pretrained(model_dir, dtype=dtype or torch.float32)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    # The input spec comes from the model's config.json in the same folder.
    processor = VLMProcessor.from_pretrained(model_dir)
    if template:
        processor = processor.with_template(template)
    return model, processor


def evaluate_run(cfg, model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Evaluate a saved model with a run config's ``eval`` section (see :class:`vlmzoo.config.EvalSection`)."""
    e = cfg.eval
    if not e.data:
        raise ValueError("eval.data is not set (the evaluation JSON file).")
    prepare_run_files(cfg)
    model, processor = load_for_eval(model_dir, e.template, torch_dtype(cfg.model.dtype))
    return evaluate_model(
        model, processor, e.data, cfg.eval_images(), high_res_images=cfg.eval_high_res_images(),
        train_data=cfg.eval_train_data(), question_type_key=e.question_type_key,
        batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, max_samples=e.max_samples, out_dir=out_dir,
        meta={"model": os.path.abspath(model_dir)}, allow_absolute_paths=cfg.data.allow_absolute_image_paths,
    )


def format_table(metrics: dict[str, Any]) -> str:
    """Accuracy per question type next to the blind control, as a Markdown table."""
    blind = metrics.get("blind", {}).get("per_type", {})
    rows = ["| question type | n | accuracy | blind control |", "|---|---:|---:|---:|"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    for qtype, row in metrics["per_type"].items():
        rows.append(f"| {qtype} | {row['n']} | {pct(row['accuracy'])} | {pct(blind.get(qtype, {}).get('accuracy'))} |")
    b = metrics.get("blind", {})
    rows.append(f"| **all** | {metrics['n']} | {pct(metrics['accuracy'])} | {pct(b.get('accuracy'))} |")
    rows.append(f"| **macro** | | {pct(metrics['macro_accuracy'])} | {pct(b.get('macro_accuracy'))} |")
    if "pope" in metrics:
        p = metrics["pope"]["all"]
        rows.append("")
        rows.append(f"POPE (yes/no, n={p['n']}): acc {pct(p['accuracy'])}, precision {pct(p['precision'])}, "
                    f"recall {pct(p['recall'])}, F1 {pct(p['f1'])}, yes-ratio {pct(p['yes_ratio'])}")
    return "\n".join(rows)


def model_folder(path: str) -> str:
    """argparse ``type`` of a ``--model`` option: an existing folder, else a usage error naming it."""
    try:
        require_model_folder(path)
    except FileNotFoundError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return path


def main(argv: list[str] | None = None) -> int:
    """``scripts/eval.py``: evaluate a saved model; flags override the config's ``eval`` section."""
    parser = argparse.ArgumentParser(description="Evaluate a saved vlmzoo model on a LLaVA-format question file.")
    parser.add_argument("--model", required=True, type=model_folder,
                        help="folder of a saved model + processor (e.g. <run>/<stage>/final)")
    parser.add_argument("--data", help="evaluation JSON (default: eval.data of the config)")
    parser.add_argument("--images", help="its image folder (default: eval.images, data.images, or the JSON's folder)")
    parser.add_argument("--high-res-images",
                        help="the same images at high resolution, for strategies with high-res crops "
                             "(default: eval.high_res_images, or data.high_res_images with data.images)")
    parser.add_argument("--train-data", help="training JSON for the blind control (default: the config's last stage)")
    parser.add_argument("--output-dir", help="where eval_metrics.json and predictions.jsonl go (default: <model>/eval)")
    add_config_arguments(parser, strategy_flag=False)
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow the flags
    setup_logging()
    cfg = config_from_args(args)
    for key in ("data", "images", "high_res_images", "train_data"):
        if getattr(args, key):
            setattr(cfg.eval, key, getattr(args, key))
    out_dir = Path(args.output_dir or Path(args.model) / "eval")
    metrics = evaluate_run(cfg, args.model, out_dir)
    print(format_table(metrics))
    print(f"\nEval metrics: {out_dir / METRICS_FILE}\nPredictions: {out_dir / PREDICTIONS_FILE}")
    return 0
