"""Checks of a data set's image files: paths that stay inside their folder, and one decode of
every image, in parallel, remembered across runs.

* :func:`resolve_image_path`: a record's image path -> the file to read. A path is relative to
  its image folder and must stay inside it: ``..`` climbing out, an absolute path, or a symlink
  whose target lies outside the folder are errors (:class:`ImagePathError`). ``allow_absolute``
  (``data.allow_absolute_image_paths``) accepts absolute paths and symlinks leading out of the
  folder; ``..`` climbing out of it stays an error.
* :func:`check_image_files`: whether each file exists and (``decode=True``) decodes, with the
  same reader training uses (:func:`open_rgb_image`). Decoding runs on a
  thread pool; a file that decoded is remembered by path, size and modification time in
  ``<cache root>/image_checks/`` (``$VLMZOO_CACHE``, else ``~/.cache/vlmzoo``), so a second run
  over the same, unchanged files only stats them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from PIL import Image

from ..utils import atomic_write_text
from .records import LlavaDataError, read_llava_records

logger = logging.getLogger(__name__)

CHECK_CACHE_VERSION = "1"
_INLINE_BELOW = 32  # fewer files than this are decoded without a thread pool


class ImagePathError(ValueError):
    """An image path that leaves its image folder (or is absolute without the opt-in)."""


def resolve_image_path(folder: str | os.PathLike, rel: str, allow_absolute: bool = False) -> str:
    """The file a record's image path ``rel`` names inside ``folder``; raises :class:`ImagePathError`
    for a path that leaves the folder (see the module docstring). Nothing is read."""
    folder = os.fspath(folder)
    if os.path.isabs(rel):
        if not allow_absolute:
            raise ImagePathError(
                f"image path {rel!r} is absolute; image paths are relative to the image folder {folder} "
                "(set data.allow_absolute_image_paths=true to read absolute paths)"
            )
        return rel
    norm = os.path.normpath(rel)
    if norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise ImagePathError(f"image path {rel!r} climbs out of its image folder {folder} ('..')")
    full = os.path.join(folder, rel)
    if not allow_absolute:
        real, root = os.path.realpath(full), _real_folder(folder)
        if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
            raise ImagePathError(
                f"image path {rel!r} resolves outside its image folder {folder} (to {real}, through a symlink; "
                "set data.allow_absolute_image_paths=true to follow symlinks out of the folder)"
            )
    return full


_REAL_FOLDERS: dict[str, str] = {}


def _real_folder(folder: str) -> str:
    if folder not in _REAL_FOLDERS:
        _REAL_FOLDERS[folder] = os.path.realpath(folder)
    return _REAL_FOLDERS[folder]


# ---- decoding, remembered ------------------------------------------------------------------------
def check_cache_dir() -> Path:
    """Where decoded-image records are kept: ``$VLMZOO_CACHE/image_checks`` (default ``~/.cache/vlmzoo``)."""
    return Path(os.environ.get("VLMZOO_CACHE") or Path.home() / ".cache" / "vlmzoo") / "image_checks"


def _stamp(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}" if os.path.isfile(path) else None


class DecodedImages:
    """The files known to decode, by real path -> ``"size:mtime_ns"``, one JSON file per folder."""

    def __init__(self, folder: str) -> None:
        real = os.path.realpath(folder)
        digest = hashlib.sha256(f"{CHECK_CACHE_VERSION}|{real}".encode()).hexdigest()[:20]
        self.path = check_cache_dir() / f"{digest}.json"
        self.entries: dict[str, str] = {}
        try:
            data = json.loads(self.path.read_text())
            if data.get("folder") == real:
                self.entries = dict(data.get("decoded") or {})
        except (OSError, ValueError):  # absent or damaged: start afresh
            pass
        self.folder = real
        self._dirty = False

    def known(self, path: str, stamp: str) -> bool:
        return self.entries.get(os.path.realpath(path)) == stamp

    def add(self, path: str, stamp: str) -> None:
        self.entries[os.path.realpath(path)] = stamp
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"folder": self.folder, "decoded": self.entries}))
        except OSError as exc:  # a read-only cache only costs the next run a decode pass
            logger.warning("Could not record decoded images in %s: %s", self.path, exc)


def open_rgb_image(path: str | os.PathLike) -> Image.Image:
    """The image file at ``path``, fully read and converted to RGB (the file is closed on return)."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def _decode_problem(path: str) -> str | None:
    try:
        open_rgb_image(path)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        return f"{type(exc).__name__}: {exc}"
    return None


def check_image_files(paths: Iterable[str], folder: str, decode: bool = True,
                      workers: int | None = None) -> dict[str, str]:
    """Check image files (all under ``folder``, whose decoded-file record is used) -> ``{path: why}``
    for each missing or (``decode``) undecodable one; an empty dict when all are fine."""
    unique = list(dict.fromkeys(paths))
    problems: dict[str, str] = {}
    stamps: dict[str, str] = {}
    for path in unique:
        stamp = _stamp(path)
        if stamp is None:
            problems[path] = "file not found"
        else:
            stamps[path] = stamp
    if not decode or not stamps:
        return problems
    memo = DecodedImages(folder)
    todo = [p for p, s in stamps.items() if not memo.known(p, s)]
    if todo:
        workers = workers or min(8, os.cpu_count() or 1)
        logger.info("Decoding %d of %d images under %s once (%d threads); remembered for later runs.",
                    len(todo), len(stamps), folder, workers)
        if len(todo) < _INLINE_BELOW or workers <= 1:
            results = [_decode_problem(p) for p in todo]
        else:
            with ThreadPoolExecutor(workers) as pool:
                results = list(pool.map(_decode_problem, todo, chunksize=16))
        for path, problem in zip(todo, results):
            if problem is None:
                memo.add(path, stamps[path])
            else:
                problems[path] = f"cannot decode: {problem}"
        memo.save()
    return problems


# ---- per record ----------------------------------------------------------------------------------
def image_problems(
    records: Iterable[tuple[int, str, list[str]]],
    folders: list[tuple[str, str]],
    mode: str = "decode",
    allow_absolute: bool = False,
) -> list[tuple[int, str, str]]:
    """``(index, id, reason)`` of every record (given as ``(index, id, image paths)``) with an image
    path that leaves its folder or (``mode`` ``exists`` / ``decode``) a file that is missing or
    does not decode, in record order. ``folders``: ``(folder, what it holds)``, e.g. the image
    folder and a high-res folder with the same relative paths; every image is checked in each."""
    found: dict[int, tuple[str, str]] = {}
    users: dict[tuple[str, str], list[tuple[int, str, str]]] = {}  # (folder, file) -> [(index, id, what)]
    for index, rid, paths in records:
        for rel in paths:
            for folder, what in folders:
                try:
                    full = resolve_image_path(folder, rel, allow_absolute)
                except ImagePathError as exc:
                    found.setdefault(index, (rid, f"{what} {exc}"))
                    continue
                users.setdefault((folder, full), []).append((index, rid, what))
    if mode != "none":
        for folder, _ in folders:
            files = [full for (f, full) in users if f == folder]
            for full, problem in check_image_files(files, folder, decode=mode == "decode").items():
                for index, rid, what in users[(folder, full)]:
                    reason = (f"{what} file not found: {full}" if problem == "file not found"
                              else f"cannot read {what} {full}: {problem}")
                    found.setdefault(index, (rid, reason))
    return [(index, rid, reason) for index, (rid, reason) in sorted(found.items())]


def check_data_file(json_path: str | os.PathLike, image_folder: str | os.PathLike | None = None, *,
                    high_res_folder: str | os.PathLike | None = None, mode: str = "decode",
                    allow_absolute: bool = False, cache_dir: str | None = None) -> int:
    """Check a LLaVA JSON file without tokenising it: the JSON, every record (roles, ``<image>``
    count), every image path and (``mode``) file; -> the number of records. The first problem is a
    :class:`~vlmzoo.data.LlavaDataError` naming the file and the record."""
    path = os.path.abspath(os.fspath(json_path))
    folder = os.fspath(image_folder) if image_folder is not None else os.path.dirname(path)
    folders = [(folder, "image")]
    if high_res_folder is not None:
        folders.append((os.fspath(high_res_folder), "high-res image"))
    for f, what in folders:
        if not os.path.isdir(f):
            raise LlavaDataError(path, f"{what} folder not found: {f}")
    records = read_llava_records(path, cache_dir=cache_dir)
    ok: list[tuple[int, str, list[str]]] = []
    for batch in records.select_columns(["index", "id", "images", "error"]).iter(batch_size=50_000):
        for index, rid, images, error in zip(batch["index"], batch["id"], batch["images"], batch["error"]):
            if error is not None:
                raise LlavaDataError(path, error, rid, index)
            ok.append((index, rid, images))
    for index, rid, reason in image_problems(ok, folders, mode, allow_absolute)[:1]:
        raise LlavaDataError(path, reason, rid, index)
    return len(records)
