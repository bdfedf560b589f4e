"""Memos of frozen encoders' features (vision tower per image, text encoder per instruction),
for small-scale runs.

LLaVA-style training never changes a frozen tower's input (no augmentation), so an image seen
again in a later epoch gives the same features. At tiny scale, where one tower pass costs as
much as a tenth of a training step, and a high-res strategy runs it on ``f**2 + 1`` images each
time, re-computing them is most of what separates two strategies' step times. The cache keys
each image by the files it was read from when the batch names them (``image_keys``, from
:class:`~vlmzoo.data.LlavaJsonDataset`; files do not change during a run), else by a hash of its
pixel values (and high-res pixels). With file keys the dataset need not even read a cached
image: it sends NaN placeholder pixels, and a placeholder that misses the cache is an error.
It lives in process memory; enable it with ``training.cache_vision_features`` (never at
reference scale, where one image's features take megabytes). One cache serves every
stage of a run (the tower's weights do not change between them); a stage that trains the tower
clears it and runs without it.

No cache is module state: a caller owns its :class:`FeatureCaches` and passes them in, to
``VLMForConditionalGeneration.forward(feature_caches=...)`` (the training run hands them to its
``VLMTrainer``, which adds them to every training batch) or to ``encode_images`` /
``encode_instructions`` (``cache=...``). Their lifetime is the caller's.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .strategy import InstructionFeatures, StrategyNeeds, VisionFeatures

logger = logging.getLogger(__name__)


@dataclass
class FeatureCaches:
    """The caches one forward call may read and fill (each ``None`` = not cached).

    Attributes:
        vision: per-image tower features; used only while the tower runs without gradients.
        text: per-instruction text-encoder features.
    """

    vision: "VisionFeatureCache | None" = None
    text: "InstructionFeatureCache | None" = None


class VisionFeatureCache:
    """Per-image :class:`VisionFeatures` rows, keyed by the strategy's needs and the image's files or pixel bytes.

    Args:
        max_bytes: stop adding entries beyond this many bytes of stored features (hits still work).
    """

    def __init__(self, max_bytes: int = 4 << 30) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._store: dict[bytes | tuple[StrategyNeeds, str], dict[tuple[str, int], torch.Tensor]] = {}
        self._full_warned = False

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        """Forget every entry (the tower's weights changed)."""
        self._store.clear()
        self.bytes = 0

    @staticmethod
    def _file_key(needs: StrategyNeeds, image_key: str) -> tuple[StrategyNeeds, str]:
        return needs, image_key  # both hashable: no digest needed

    def contains(self, needs: StrategyNeeds, image_key: str) -> bool:
        """Whether the features of the image read from ``image_key``'s files are cached."""
        return self._file_key(needs, image_key) in self._store

    @staticmethod
    def _key(needs: StrategyNeeds, pixels: torch.Tensor, pixels_hr: torch.Tensor | None) -> bytes:
        digest = hashlib.blake2b(repr(needs).encode(), digest_size=16)
        for t in (pixels, pixels_hr):
            if t is not None:
                digest.update(str((t.dtype, tuple(t.shape))).encode())
                digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.digest()

    def encode(
        self,
        compute: Callable[[torch.Tensor, torch.Tensor | None], VisionFeatures],
        needs: StrategyNeeds,
        pixel_values: torch.Tensor,
        pixel_values_hr: torch.Tensor | None = None,
        image_keys: Sequence[str] | None = None,
    ) -> VisionFeatures:
        """``compute(pixels (M, 3, H, W), pixels_hr)`` runs only on the images not cached yet;
        returns the features of all N images in order. ``image_keys`` (N str) name the images'
        files; without them each image is keyed by its pixels."""
        n = pixel_values.shape[0]
        if image_keys is not None:
            if len(image_keys) != n:
                raise ValueError(f"{len(image_keys)} image_keys for {n} images.")
            keys = [self._file_key(needs, k) for k in image_keys]
        else:
            keys = [
                self._key(needs, pixel_values[i], None if pixel_values_hr is None else pixel_values_hr[i])
                for i in range(n)
            ]
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh: dict[Any, dict[tuple[str, int], torch.Tensor]] = {}
        if missing:
            idx = torch.tensor(missing, device=pixel_values.device)
            pixels, hr = pixel_values[idx], None if pixel_values_hr is None else pixel_values_hr[idx]
            if image_keys is not None:
                _check_loaded(pixels, hr, [image_keys[i] for i in missing])
            for row, i in enumerate(missing):
                # One image per tower pass: an image's features then never depend on which other
                # images missed the cache in the same step (a batched matmul's rounding depends on
                # the batch), so a resumed run, whose cache starts empty, gets bit-identical ones.
                one = compute(pixels[row : row + 1], None if hr is None else hr[row : row + 1])
                entry = {(kind, layer): t[0].detach().clone() for kind, part in _parts(one) for layer, t in part.items()}
                fresh[keys[i]] = entry
                self._remember(keys[i], entry)
        entries = [self._store.get(k) or fresh[k] for k in keys]
        out = VisionFeatures(layers={}, cls={}, high_res={})
        for kind, part in _parts(out):
            for kind_key, layer in entries[0]:
                if kind_key == kind:
                    part[layer] = torch.stack([e[(kind, layer)] for e in entries])
        return out

    def _remember(self, key: Any, entry: dict[tuple[str, int], torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry.values())
        if self.bytes + size > self.max_bytes:
            if not self._full_warned:
                logger.warning("Vision feature cache is full (%.1f GiB); new images are no longer cached.", self.bytes / 2**30)
                self._full_warned = True
            return
        self._store[key] = entry
        self.bytes += size


class InstructionFeatureCache:
    """Per-instruction text-encoder features, keyed by the instruction's token ids.

    The text encoder is always frozen, and at tiny scale one instruction (a question) recurs
    across many samples, so its features are computed once. Exact for encoders whose features
    of the real tokens do not depend on the padding (causal CLIP text towers with their
    attention mask, or encoders padded to a fixed length): :class:`~vlmzoo.towers.text.TextEncoder`
    implementations are. Padding positions of the returned ``tokens`` are zeros.

    Args:
        max_entries: stop adding entries beyond this many instructions (hits still work).
    """

    def __init__(self, max_entries: int = 1_000_000) -> None:
        self.max_entries = int(max_entries)
        self.hits = 0
        self.misses = 0
        self._store: dict[bytes, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def __len__(self) -> int:
        return len(self._store)

    def encode(
        self,
        compute: Callable[[torch.Tensor, torch.Tensor], InstructionFeatures],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> InstructionFeatures:
        """``compute(ids (M, L), mask (M, L))`` runs only on instructions not seen yet; returns
        pooled ``(N, D_t)``, tokens ``(N, L, D_t)`` and ``attention_mask`` for all N rows."""
        lengths = attention_mask.sum(dim=1).tolist()
        keys = [input_ids[i, : int(n)].cpu().numpy().tobytes() for i, n in enumerate(lengths)]
        first_row = {k: i for i, k in reversed(list(enumerate(keys)))}  # one encoder row per distinct instruction
        missing = sorted(i for k, i in first_row.items() if k not in self._store)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh: dict[bytes, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        for i in missing:
            # One instruction per encoder pass, unpadded: its features never depend on the other
            # instructions of the step (see VisionFeatureCache.encode), so resumed runs match.
            n = int(lengths[i])
            out = compute(input_ids[i : i + 1, :n], attention_mask[i : i + 1, :n])
            pooled = None if out.pooled is None else out.pooled[0].detach().clone()
            tokens = None if out.tokens is None else out.tokens[0, :n].detach().clone()
            fresh[keys[i]] = (pooled, tokens)
            if len(self._store) < self.max_entries:
                self._store[keys[i]] = fresh[keys[i]]
        entries = [self._store.get(k) or fresh[k] for k in keys]
        pooled = None if entries[0][0] is None else torch.stack([e[0] for e in entries])
        tokens = None
        if entries[0][1] is not None:
            first = entries[0][1]
            tokens = first.new_zeros(len(entries), input_ids.shape[1], first.shape[-1])
            for i, (_, t) in enumerate(entries):
                tokens[i, : t.shape[0]] = t
        return InstructionFeatures(pooled=pooled, tokens=tokens, mask=attention_mask)


def _check_loaded(pixels: torch.Tensor, pixels_hr: torch.Tensor | None, names: list[str]) -> None:
    """Raise if an image to encode is a NaN placeholder (not read because it was thought cached)."""
    flat = pixels.flatten(1) if pixels_hr is None else torch.cat([pixels.flatten(1), pixels_hr.flatten(1)], dim=1)
    placeholders = torch.isnan(flat).all(dim=1)
    if placeholders.any():
        bad = [name for name, p in zip(names, placeholders.tolist()) if p]
        raise RuntimeError(
            f"{len(bad)} image(s) were not read because their features were cached, but they are not in the "
            f"vision feature cache (was it cleared during the stage?): {bad[:5]}"
        )


def _parts(features: VisionFeatures) -> list[tuple[str, dict[int, torch.Tensor]]]:
    return [("layers", features.layers), ("cls", features.cls), ("high_res", features.high_res)]
