"""LLaVA-format JSON records: the streaming reader and the normalised, cached Arrow records
(steps 1 and 2 of the pipeline described in :mod:`vlmzoo.data.llava_json`).

A LLaVA file is a JSON array (JSON Lines also work) of records::

    {"id": "000001", "image": "coco/train2017/000001.jpg",   # relative to the image folder; absent = text-only
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}, ...]}

A human turn may also carry ``"regions"``, the boxes it is about (:mod:`vlmzoo.data.regions`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, TextIO

import datasets
from datasets import Features, List, Value
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher

from .regions import REGIONS_KEY, parse_regions, query_regions
from .templates import DEFAULT_IMAGE_TOKEN

CACHE_VERSION = "5"  # bump when the record layout or the encoding changes (5: query_regions column)
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant", "system": "system"}

RECORD_FEATURES = Features(
    {
        "index": Value("int64"),
        "id": Value("string"),
        "images": List(Value("string")),
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "query_regions": List(List(Value("float64"))),  # the last user turn's regions; null: no field
        "error": Value("string"),
    }
)


class LlavaDataError(ValueError):
    """Bad data; the message names the file and, when known, the record id and index."""

    def __init__(self, file: str, reason: str, record_id: str | None = None, index: int | None = None) -> None:
        self.file, self.reason, self.record_id, self.index = file, reason, record_id, index
        where = ""
        if record_id is not None or index is not None:
            where = f" record {record_id!r}" if record_id is not None else ""
            where += f" (#{index})" if index is not None else ""
            where += ":"
        super().__init__(f"{file}:{where} {reason}")


@dataclass(frozen=True)
class SkippedRecord:
    """A record left out in ``on_error="skip"`` mode."""

    record_id: str
    index: int
    reason: str


# ---- 1. incremental JSON reading ---------------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")
_ID_RE = re.compile(r'"id"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)')


class _Window:
    """A sliding text window over a file; positions are relative to ``buf``."""

    def __init__(self, f: TextIO, chunk_chars: int) -> None:
        self.f, self.chunk_chars = f, chunk_chars
        self.buf, self.pos, self.eof = "", 0, False
        # characters and newlines dropped before buf[0], and the column buf[0] is at (0-based)
        self.base_chars = self.base_lines = self.base_column = 0

    def fill(self) -> bool:
        """Read one more chunk (dropping consumed text); False at end of file."""
        if self.eof:
            return False
        data = self.f.read(self.chunk_chars)
        if not data:
            self.eof = True
            return False
        if self.pos:
            last_newline = self.buf.rfind("\n", 0, self.pos)
            self.base_column = self.pos - last_newline - 1 if last_newline >= 0 else self.base_column + self.pos
            self.base_lines += self.buf.count("\n", 0, self.pos)
            self.base_chars += self.pos
            self.buf, self.pos = self.buf[self.pos :], 0
        self.buf += data
        return True

    def peek(self) -> str:
        """Next non-whitespace character ("" at end of file), without consuming it."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self.fill():
                return self.buf[self.pos : self.pos + 1]

    def location(self, p: int) -> str:
        line = self.base_lines + self.buf.count("\n", 0, p) + 1
        last_newline = self.buf.rfind("\n", 0, p)
        column = p - last_newline if last_newline >= 0 else self.base_column + p + 1
        return f"line {line}, column {column} (character {self.base_chars + p})"


def _guess_id(text: str) -> str | None:
    """The ``"id"`` of a (possibly broken) record's text, if it can be read."""
    m = _ID_RE.search(text)
    if not m:
        return None
    try:
        return str(json.loads(m.group(1)))
    except ValueError:
        return None


def iter_json_records(
    path: str | os.PathLike, chunk_chars: int = 1 << 20, max_record_chars: int = 64 << 20
) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, record)`` from a JSON array file (or JSON Lines) without loading it whole.

    Raises :class:`LlavaDataError` for a missing file, an empty file, an empty array, or malformed
    JSON (the message gives the line/column, the record's index and its id when readable).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LlavaDataError(os.path.abspath(path), "file not found." if not os.path.exists(path) else "not a file.")
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as f:
        w = _Window(f, chunk_chars)
        first = w.peek()
        if first == "":
            raise LlavaDataError(path, "the file is empty (expected a JSON array of records).")
        if first == "{":
            yield from _iter_json_lines(path)
            return
        if first != "[":
            raise LlavaDataError(path, f"expected a JSON array of records ('[') at {w.location(w.pos)}, found {first!r}.")
        w.pos += 1
        if w.peek() == "]":
            raise LlavaDataError(path, "the JSON array is empty: no records.")
        index = 0
        while True:
            if w.peek() == "":
                raise LlavaDataError(path, f"malformed JSON: the file ends inside the array (record #{index}) at {w.location(w.pos)}.")
            while True:  # decode one record, reading more text while it is incomplete
                try:
                    record, end = decoder.raw_decode(w.buf, w.pos)
                except json.JSONDecodeError as exc:
                    near_end = exc.pos >= len(w.buf) - 16 or exc.msg.startswith("Unterminated string")
                    if near_end and len(w.buf) - w.pos < max_record_chars and w.fill():
                        continue
                    rid = _guess_id(w.buf[w.pos : exc.pos])
                    raise LlavaDataError(
                        path, f"malformed JSON at {w.location(exc.pos)}: {exc.msg}.", rid, index
                    ) from None
                if end == len(w.buf) and w.fill():
                    continue  # the value may continue in the next chunk
                break
            yield index, record
            index += 1
            w.pos = end
            sep = w.peek()
            if sep == ",":
                w.pos += 1
            elif sep == "]":
                w.pos += 1
                if w.peek() != "":
                    raise LlavaDataError(path, f"malformed JSON: unexpected data after the array at {w.location(w.pos)}.")
                return
            else:
                what = "the file ends" if sep == "" else f"found {sep!r}"
                rid = record.get("id") if isinstance(record, dict) else None
                raise LlavaDataError(
                    path,
                    f"malformed JSON at {w.location(w.pos)}: expected ',' or ']' after this record, {what}.",
                    None if rid is None else str(rid),
                    index - 1,
                )


def _iter_json_lines(path: str) -> Iterator[tuple[int, Any]]:
    index = 0
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LlavaDataError(
                    path,
                    f"malformed JSON at line {lineno}, column {exc.colno}: {exc.msg} "
                    "(read as JSON Lines because the file starts with '{').",
                    _guess_id(line),
                    index,
                ) from None
            yield index, record
            index += 1


# ---- 2. normalised records, cached as Arrow ----------------------------------------------------------


class _RecordProblem(ValueError):
    def __init__(self, reason: str, record_id: str) -> None:
        super().__init__(reason)
        self.reason, self.record_id = reason, record_id


def normalize_record(raw: Any, index: int) -> dict[str, Any]:
    """One raw LLaVA record -> ``{"index", "id", "images", "messages", "error": None}``.

    A user message whose turn has a ``regions`` field keeps it, parsed, under ``"regions"``.
    Raises ``ValueError`` (with ``record_id``) for a malformed record, bad regions (or regions on a
    turn that is not human), or a record whose ``<image>`` count differs from its number of images.
    """
    if not isinstance(raw, dict):
        raise _RecordProblem(f"record is a JSON {type(raw).__name__}, expected an object.", f"#{index}")
    rid = f"#{index}" if raw.get("id") is None else str(raw["id"])
    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _RecordProblem("'conversations' must be a non-empty list.", rid)
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            raise _RecordProblem(
                f"turn {t} must be {{'from': one of {sorted(_ROLES)}, 'value': str}}, got {str(turn)[:200]}.", rid
            )
        message = {"role": _ROLES[turn["from"]], "content": turn["value"]}
        if REGIONS_KEY in turn:
            if message["role"] != "user":
                raise _RecordProblem(f"turn {t} ({message['role']}) has 'regions'; regions belong to human turns.", rid)
            try:
                message[REGIONS_KEY] = parse_regions(turn[REGIONS_KEY])
            except ValueError as exc:
                raise _RecordProblem(f"turn {t}: {exc}", rid) from None
        messages.append(message)
    image = raw.get("image")
    images = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise _RecordProblem(f"'image' must be a path or a list of paths, got {image!r}.", rid)
    for t, m in enumerate(messages):
        if m["role"] != "user" and DEFAULT_IMAGE_TOKEN in m["content"]:
            raise _RecordProblem(f"turn {t} ({m['role']}) contains {DEFAULT_IMAGE_TOKEN}; images belong in human turns.", rid)
    n_placeholders = sum(m["content"].count(DEFAULT_IMAGE_TOKEN) for m in messages)
    if n_placeholders != len(images):
        raise _RecordProblem(
            f"{n_placeholders} {DEFAULT_IMAGE_TOKEN} placeholder(s) in its conversations but {len(images)} image(s) "
            "in its 'image' field.",
            rid,
        )
    return {"index": index, "id": rid, "images": images, "messages": messages, "error": None}


def _generate_records(path: str, stamp: str) -> Iterator[dict[str, Any]]:
    del stamp  # only part of the cache key
    for index, raw in iter_json_records(path):
        try:
            record = normalize_record(raw, index)
        except _RecordProblem as exc:
            yield {"index": index, "id": exc.record_id, "images": [], "messages": [], "query_regions": None,
                   "error": exc.reason}
            continue
        messages = record["messages"]
        record["query_regions"] = query_regions(messages)
        record["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
        yield record


def read_llava_records(path: str | os.PathLike, cache_dir: str | None = None) -> datasets.Dataset:
    """Normalised records of a LLaVA JSON file as a cached, memory-mapped ``datasets.Dataset``.

    Columns: ``index`` (position in the file), ``id``, ``images`` (relative paths), ``messages``
    (``[{"role", "content"}]``), ``query_regions`` (the last user turn's ``regions`` boxes, ``None``
    when it has no such field), ``error`` (``None``, or why the record is invalid). Re-reading an
    unchanged file reuses the cache. Raises :class:`LlavaDataError` for file-level problems
    (missing, empty, malformed JSON).
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise LlavaDataError(path, "file not found.")
    st = os.stat(path)
    stamp = f"{st.st_size}-{st.st_mtime_ns}"
    fingerprint = Hasher.hash([CACHE_VERSION, path, stamp])
    try:
        return datasets.Dataset.from_generator(
            _generate_records,
            features=RECORD_FEATURES,
            gen_kwargs={"path": path, "stamp": stamp},
            cache_dir=cache_dir,
            fingerprint=fingerprint,
        )
    except DatasetGenerationError as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, LlavaDataError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise
