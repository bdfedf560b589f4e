"""LLaVA-format JSON data: cached tokenisation, a torch dataset and a collator.

The file format is described in :mod:`vlmzoo.data.records`. Pipeline (every step bounded in
memory, so a 665K-record file is fine):

1. :func:`~vlmzoo.data.records.iter_json_records` parses the array incrementally (a ~1 MB
   window); malformed JSON is an error with its line/column.
2. :func:`~vlmzoo.data.records.read_llava_records` normalises each record (roles ->
   ``user``/``assistant``/``system``, ``image`` -> a list) into an Arrow dataset cached by
   ``datasets`` (keyed by path, size and mtime). Records that fail validation are kept with an
   ``error`` column so both error modes share the cache.
3. :class:`LlavaJsonDataset` checks every image path stays inside its folder and the image files
   (:mod:`vlmzoo.data.checks`), tokenises every record with the processor's template (cached
   ``Dataset.map``), checks lengths against the LLM's positions, counts truncations (one summary
   warning), and raises on the first bad record (``on_error="raise"``) or skips bad records and
   reports them by id (``on_error="skip"``: one summary warning, the full list in ``dataset.skipped``).
   Then it checks a few samples' label masks against their conversations
   (:func:`~vlmzoo.data.supervision.check_supervision`) and refuses the data set, naming the
   record, on a "tokenization mismatch".
4. ``dataset[i]`` loads and preprocesses the images; :class:`VLMDataCollator` pads a list of those
   into the model's batch (see :mod:`vlmzoo.processing`).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Literal

import datasets
import torch
from datasets import Features, List, Value
from datasets.fingerprint import Hasher
from PIL import Image

from ..strategy import view_key, view_name
from .checks import ImagePathError, image_problems, open_rgb_image, resolve_image_path
from .records import CACHE_VERSION, LlavaDataError, SkippedRecord, read_llava_records
from .supervision import TokenizationMismatchError, check_supervision
from .templates import DEFAULT_IMAGE_TOKEN, TemplateEncoder

if TYPE_CHECKING:
    from ..processing import VLMProcessor

logger = logging.getLogger(__name__)

_CHECK_WINDOW = 256  # check_samples picks the longest conversations among this many usable records

OnError = Literal["raise", "skip"]
ImageCheck = Literal["none", "exists", "decode"]

ENCODED_FEATURES = Features(
    {
        "index": Value("int64"),
        "id": Value("string"),
        "images": List(Value("string")),
        "query_regions": List(List(Value("float64"))),
        "input_ids": List(Value("int32")),
        "labels": List(Value("int32")),
        "instruction_mask": List(Value("bool")),
        "query_text": Value("string"),
        "truncated": Value("bool"),
        "length": Value("int32"),
        "error": Value("string"),
    }
)


# ---- 3. tokenised dataset ----------------------------------------------------------------------------


def _prepare_messages(messages: list[dict[str, str]], n_images: int, image_token: str, move_image_to_front: bool) -> list[dict[str, str]]:
    out = []
    for m in messages:
        content = m["content"]
        if move_image_to_front and n_images == 1 and content.count(DEFAULT_IMAGE_TOKEN) == 1:
            # LLaVA-1.5 puts the single image first: "<image>\n" + the rest of the turn.
            content = DEFAULT_IMAGE_TOKEN + "\n" + content.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        if image_token != DEFAULT_IMAGE_TOKEN:
            content = content.replace(DEFAULT_IMAGE_TOKEN, image_token)
        out.append({**m, "content": content})  # a user turn's "regions" stay with it
    return out


def _encode_batch(
    batch: dict[str, list[Any]], encoder: TemplateEncoder, max_length: int | None, move_image_to_front: bool
) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {k: [] for k in ("input_ids", "labels", "instruction_mask", "query_text", "truncated", "length", "error")}
    for messages, images, error in zip(batch["messages"], batch["images"], batch["error"]):
        enc = None
        if error is None:
            try:
                prepared = _prepare_messages(messages, len(images), encoder.image_token, move_image_to_front)
                enc = encoder.encode(prepared, max_length=max_length)
            except ValueError as exc:  # template/role problems, image truncation
                error = str(exc)
        out["input_ids"].append(enc.input_ids if enc else [])
        out["labels"].append(enc.labels if enc else [])
        out["instruction_mask"].append(enc.instruction_mask if enc else [])
        out["query_text"].append(enc.query_text if enc else "")
        out["truncated"].append(bool(enc and enc.truncated))
        out["length"].append(len(enc) if enc else 0)
        out["error"].append(error)
    return out


def _tokenizer_state(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else Hasher.hash(tokenizer)
    return Hasher.hash([state, type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id])


class LlavaJsonDataset(torch.utils.data.Dataset):
    """A LLaVA JSON file, tokenised with a :class:`~vlmzoo.VLMProcessor`'s template.

    Args:
        json_path: the LLaVA ``.json`` (array) or ``.jsonl`` file.
        processor: supplies the tokenizer, template, image token, ``num_visual_tokens`` and image preprocessing.
        image_folder: root of the records' relative image paths (default: the JSON file's folder).
        high_res_folder: a folder with the same relative paths holding each image at high
            resolution (e.g. the tiny world's ``images_2x/``): the source of the crop view when the
            processor's input spec has one (scale f > 1 in ``image_views``); every item then also gets
            ``pixel_values_hr`` ``(n_i, 3, f*H, f*W)`` from these files (a missing one is a bad
            record, as a missing image is). Without a crop view it is not read.
        max_length: truncate longer samples (counted, one summary warning); a cut reaching image
            tokens is a bad record.
        max_positions: the LLM's position limit (``max_position_embeddings``): a sample longer
            than it (after ``max_length``) is a bad record. ``None``: not checked.
        on_error: ``"raise"`` on the first bad record, or ``"skip"`` bad records and report them
            (``self.skipped``; one summary warning). Malformed JSON always raises.
        check_images: at load time, check that image files ``"exists"`` (default), also ``"decode"``
            them (once, in parallel, remembered for unchanged files: see :mod:`vlmzoo.data.checks`),
            or ``"none"``. Unreadable images found later, in ``__getitem__``, raise (or, when
            skipping, are warned about and replaced by the next record). Whatever the mode, a path
            that leaves its image folder is a bad record.
        allow_absolute_paths: accept absolute image paths and symlinks out of the image folder
            (``data.allow_absolute_image_paths``); ``..`` climbing out of it stays an error.
        move_image_to_front: like LLaVA-1.5, rewrite a single-image turn to ``"<image>\\n" + text``.
        check_samples: before use, check this many samples (those with the most turns among the
            first 256 usable records) with :func:`~vlmzoo.data.supervision.check_supervision`: a
            label mask that disagrees with the conversation (LLaVA's "tokenization mismatch")
            raises :class:`~vlmzoo.data.LlavaDataError` naming the record, whatever ``on_error``
            says (it is the template or tokenizer at fault, not the record). 0 = no check.
        cache_dir: ``datasets`` cache directory (default: the ``datasets`` cache).
        num_proc: processes for tokenisation.
        features_cached: optional ``image_key -> bool``, from a training run whose frozen tower's
            features are memoised (:mod:`vlmzoo.feature_cache`). A record all of whose images are
            cached is not read from disk: its pixel rows are NaN placeholders, which the model never
            encodes (it raises if it would). Only for loading in the training process
            (``num_workers=0``).

    ``self[i]`` -> ``{"id", "input_ids", "labels", "instruction_mask", "query_text",
    "pixel_values" (n_i, 3, H, W), "image_keys"}`` (+ ``"pixel_values_hr"`` with a high-res
    folder, + ``"query_regions"`` (boxes) when the processor's input spec has a region grid: then a
    record with images whose query has no ``regions`` field is a bad record); batch those with
    :class:`VLMDataCollator`. ``image_keys`` names each image's files
    (its path, and its high-res path after a ``|``).

    """

    def __init__(
        self,
        json_path: str | os.PathLike,
        processor: "VLMProcessor",
        image_folder: str | os.PathLike | None = None,
        *,
        high_res_folder: str | os.PathLike | None = None,
        max_length: int | None = None,
        max_positions: int | None = None,
        on_error: OnError = "raise",
        check_images: ImageCheck = "exists",
        allow_absolute_paths: bool = False,
        move_image_to_front: bool = True,
        check_samples: int = 4,
        cache_dir: str | None = None,
        num_proc: int | None = None,
        features_cached: Callable[[str], bool] | None = None,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
        if check_images not in ("none", "exists", "decode"):
            raise ValueError(f"check_images must be 'none', 'exists' or 'decode', got {check_images!r}.")
        self.json_path = os.path.abspath(os.fspath(json_path))
        self.image_folder = os.fspath(image_folder) if image_folder is not None else os.path.dirname(self.json_path)
        # scale -> folder of every view read: the base view always, the crop view from high_res_folder
        self.view_folders = processor.view_folders(self.image_folder, high_res_folder)
        for scale, folder in self.view_folders.items():
            if scale > 1 and not os.path.isdir(folder):
                raise LlavaDataError(self.json_path, f"{view_name(scale)} folder not found: {folder}")
        if high_res_folder is not None and len(self.view_folders) == 1:
            logger.info("%s: high-res images %s not read (the model reads no crop view).",
                        self.json_path, os.fspath(high_res_folder))
        self.processor = processor
        self.on_error = on_error
        self.max_length = max_length
        self.max_positions = max_positions
        self.allow_absolute_paths = allow_absolute_paths
        self.skipped: list[SkippedRecord] = []
        self.runtime_skipped: list[SkippedRecord] = []  # found in __getitem__ (this process only)
        self.features_cached = features_cached
        self.reads_saved = 0  # records served without reading their images (features_cached)

        records = read_llava_records(self.json_path, cache_dir=cache_dir)
        self.num_records = len(records)
        errors: dict[int, tuple[str, str]] = {}
        self._collect_errors(records, errors)
        self._check_image_files(records, errors, check_images)

        encoder = processor.encoder
        fingerprint = Hasher.hash(
            [CACHE_VERSION, records._fingerprint, encoder.template.to_dict(), encoder.image_token,
             encoder.num_visual_tokens, encoder.instruction_rule, encoder.visual_tokens_first, max_length,
             move_image_to_front, _tokenizer_state(encoder.tokenizer)]
        )
        encoded = records.map(
            _encode_batch,
            batched=True,
            batch_size=1000,
            fn_kwargs={"encoder": encoder, "max_length": max_length, "move_image_to_front": move_image_to_front},
            remove_columns=["messages"],
            features=ENCODED_FEATURES,
            new_fingerprint=fingerprint,
            num_proc=num_proc,
            desc=f"Tokenizing {os.path.basename(self.json_path)}",
        )
        self._collect_errors(encoded, errors)
        if max_positions is not None:
            self._check_lengths(encoded, errors, max_positions)
        if processor.input_spec.query_regions:
            self._check_regions(encoded, errors)

        if errors:
            keep = [i for i in range(len(encoded)) if i not in errors]
            self.skipped = [SkippedRecord(rid, i, reason) for i, (rid, reason) in sorted(errors.items())]
            encoded = encoded.select(keep)
            shown = "; ".join(f"{s.record_id!r} ({s.reason})" for s in self.skipped[:20])
            more = f"; ... and {len(self.skipped) - 20} more (see .skipped)" if len(self.skipped) > 20 else ""
            logger.warning(
                "%s: skipped %d of %d records (on_error='skip'): %s%s",
                self.json_path, len(self.skipped), self.num_records, shown, more,
            )
        self.data = encoded
        self.num_truncated = sum(sum(b["truncated"]) for b in encoded.select_columns(["truncated"]).iter(batch_size=50_000))
        if self.num_truncated:
            logger.warning(
                "%s: truncated %d of %d records to max_length=%s tokens.",
                self.json_path, self.num_truncated, len(encoded), max_length,
            )
        if len(self.data) == 0:
            raise LlavaDataError(self.json_path, f"no usable records (all {self.num_records} were skipped).")
        self._check_supervision(records, set(errors), check_samples, move_image_to_front)

    # ---- validation -----------------------------------------------------------------------------------
    def _bad(self, errors: dict[int, tuple[str, str]], index: int, record_id: str, reason: str) -> None:
        if self.on_error == "raise":
            raise LlavaDataError(self.json_path, reason, record_id, index)
        errors.setdefault(index, (record_id, reason))

    def _check_supervision(self, records: datasets.Dataset, bad: set[int], n: int, move_image_to_front: bool) -> None:
        """Refuse the data set, naming the record, if one of ``n`` samples trains on anything but its answers."""
        if n <= 0:
            return
        encoder = self.processor.encoder
        usable = []
        for batch in records.iter(batch_size=_CHECK_WINDOW):
            for index, rid, messages, images, error in zip(
                batch["index"], batch["id"], batch["messages"], batch["images"], batch["error"]
            ):
                if error is None and index not in bad:
                    usable.append((index, rid, messages, images))
            if len(usable) >= _CHECK_WINDOW:
                break
        usable = sorted(usable[:_CHECK_WINDOW], key=lambda r: -len(r[2]))[:n]
        for index, rid, messages, images in sorted(usable, key=lambda r: r[0]):
            prepared = _prepare_messages(messages, len(images), encoder.image_token, move_image_to_front)
            try:
                check_supervision(encoder, prepared)
            except TokenizationMismatchError as exc:
                raise LlavaDataError(self.json_path, f"tokenization mismatch: {exc}", rid, index) from exc

    def _collect_errors(self, ds: datasets.Dataset, errors: dict[int, tuple[str, str]]) -> None:
        for batch in ds.select_columns(["index", "id", "error"]).iter(batch_size=50_000):
            for index, rid, error in zip(batch["index"], batch["id"], batch["error"]):
                if error is not None:
                    self._bad(errors, index, rid, error)

    def _check_image_files(self, ds: datasets.Dataset, errors: dict[int, tuple[str, str]], mode: ImageCheck) -> None:
        """Every image path inside its folder; with ``mode`` ``exists``/``decode``, every file there
        (and decodable): :func:`vlmzoo.data.checks.image_problems`."""
        rows = ((index, rid, paths)
                for batch in ds.select_columns(["index", "id", "images", "error"]).iter(batch_size=10_000)
                for index, rid, paths, error in zip(batch["index"], batch["id"], batch["images"], batch["error"])
                if error is None)
        for index, rid, reason in image_problems(rows, self._image_folders(), mode, self.allow_absolute_paths):
            self._bad(errors, index, rid, reason)

    def _check_lengths(self, ds: datasets.Dataset, errors: dict[int, tuple[str, str]], limit: int) -> None:
        for batch in ds.select_columns(["index", "id", "length", "images", "error"]).iter(batch_size=50_000):
            for index, rid, length, images, error in zip(batch["index"], batch["id"], batch["length"], batch["images"],
                                                         batch["error"]):
                if error is None and length > limit:
                    self._bad(errors, index, rid, (
                        f"{length} tokens ({len(images)} image(s) x {self.processor.num_visual_tokens} visual tokens "
                        f"included), more than the LLM's {limit} positions (max_position_embeddings); set a max_length "
                        f"(data.max_length) <= {limit} to truncate, or drop the record"))

    def _check_regions(self, ds: datasets.Dataset, errors: dict[int, tuple[str, str]]) -> None:
        """A record with images must give its query's regions when the model reads them."""
        for batch in ds.select_columns(["index", "id", "images", "query_regions", "error"]).iter(batch_size=50_000):
            for index, rid, images, regions, error in zip(batch["index"], batch["id"], batch["images"],
                                                          batch["query_regions"], batch["error"]):
                if error is None and images and regions is None:
                    self._bad(errors, index, rid, (
                        "its query (the last human turn) has no 'regions', which the model reads (its strategy "
                        f"needs the query's regions: input spec query_region_grid={self.processor.input_spec.query_region_grid}); "
                        "give the boxes the question is about, [] if none"))

    def _image_folders(self) -> list[tuple[str, str]]:
        """(folder, what it holds) of every folder an item reads its images from."""
        return [(folder, view_name(scale)) for scale, folder in self.view_folders.items()]

    # ---- access ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.data)

    @property
    def lengths(self) -> list[int]:
        """Token length of every sample (for length-grouped sampling)."""
        return list(self.data["length"])

    @property
    def modality_lengths(self) -> list[int]:
        """Lengths, negative for text-only samples (LLaVA's modality-grouped sampler convention)."""
        return [n if imgs else -n for n, imgs in zip(self.data["length"], self.data["images"])]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        for attempt in range(len(self)):
            row = self.data[(i + attempt) % len(self)]
            try:
                return self._load(row)
            except LlavaDataError as exc:
                if self.on_error == "raise":
                    raise
                self.runtime_skipped.append(SkippedRecord(row["id"], row["index"], exc.reason))
                logger.warning("%s (on_error='skip': using the next record; %d skipped in this process)", exc, len(self.runtime_skipped))
        raise LlavaDataError(self.json_path, "no record could be loaded.")

    def image_key(self, rel: str) -> str:
        """The files one image of a record is read from, one per view: ``path`` or ``path|high_res_path``."""
        # os.path.join keeps an absolute rel as it is, as resolve_image_path does
        return "|".join(os.path.abspath(os.path.join(folder, rel)) for folder in self.view_folders.values())

    def _load(self, row: dict[str, Any]) -> dict[str, Any]:
        keys = [self.image_key(rel) for rel in row["images"]]
        item = {
            "id": row["id"],
            "input_ids": row["input_ids"],
            "labels": row["labels"],
            "instruction_mask": row["instruction_mask"],
            "query_text": row["query_text"],
            "image_keys": keys,
        }
        if self.processor.input_spec.query_regions:
            item["query_regions"] = row["query_regions"]
        if keys and self.features_cached is not None and all(self.features_cached(k) for k in keys):
            for scale in self.view_folders:
                item[view_key(scale)] = torch.full((len(keys), *self.processor.view_shape(scale)), float("nan"))
            self.reads_saved += 1
            return item
        base: list[Image.Image] = []
        for scale, folder in self.view_folders.items():
            images = [self._read(row, folder, rel, view_name(scale)) for rel in row["images"]]
            for rel, image, base_image in zip(row["images"], images, base):  # base is [] for the base view
                problem = high_res_size_problem(base_image.size, image.size)
                if problem:
                    raise LlavaDataError(self.json_path, f"{problem} ({os.path.join(self.image_folder, rel)} vs "
                                         f"{os.path.join(folder, rel)})", row["id"], row["index"])
            base = base or images
            item[view_key(scale)] = self.processor.preprocess_images(images, scale)
        return item

    def _read(self, row: dict[str, Any], folder: str, rel: str, what: str) -> Image.Image:
        try:
            full = resolve_image_path(folder, rel, self.allow_absolute_paths)
        except ImagePathError as exc:
            raise LlavaDataError(self.json_path, f"{what} {exc}", row["id"], row["index"]) from None
        if not os.path.isfile(full):
            raise LlavaDataError(self.json_path, f"{what} file not found: {full}", row["id"], row["index"])
        try:
            return open_rgb_image(full)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            raise LlavaDataError(self.json_path, f"cannot read {what} {full}: {exc}", row["id"], row["index"]) from exc


def high_res_size_problem(base: tuple[int, int], high_res: tuple[int, int]) -> str | None:
    """Why an image of ``high_res`` (w, h) pixels cannot be the picture of ``base`` (w, h) pixels at
    a higher resolution (another aspect ratio, beyond a pixel of the base, or smaller), else ``None``."""
    (w, h), (hw, hh) = base, high_res
    if hw < w or hh < h or abs(hw * h - hh * w) > max(hw, hh):
        return f"the high-res image is {hw}x{hh} pixels, its base image {w}x{h}: not the same picture at a higher resolution"
    return None


# ---- 4. collation ----------------------------------------------------------------------------------


class VLMDataCollator:
    """Pads :class:`LlavaJsonDataset` items into a batch (``processor.pad``; see :mod:`vlmzoo.processing`).

    Args:
        processor: the dataset's processor.
        padding_side: ``"right"`` for training (default) or ``"left"``.
    """

    def __init__(self, processor: "VLMProcessor", padding_side: str = "right") -> None:
        self.processor = processor
        self.padding_side = padding_side

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        return self.processor.pad(features, padding_side=self.padding_side)
