"""A memo of a frozen vision tower's features, per image, for small-scale runs.

LLaVA-style training never changes a frozen tower's input (no augmentation), so an image seen
again in a later epoch gives the same features. At tiny scale, where one tower pass costs as
much as a tenth of a training step, and a high-res strategy runs it on ``f**2 + 1`` images each
time, re-computing them is most of what separates two strategies' step times. The cache keys
each image by a hash of its pixel values (and high-res pixels), so a changed image is a miss,
never a stale hit. It lives in process memory; enable it with ``training.cache_vision_features``
(never at reference scale, where one image's features take megabytes). One cache serves every
stage of a run (the tower's weights do not change between them); a stage that trains the tower
clears it and runs without it.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Callable

import torch

from .strategy import StrategyNeeds, VisionFeatures

logger = logging.getLogger(__name__)


class VisionFeatureCache:
    """Per-image :class:`VisionFeatures` rows, keyed by pixel bytes and the strategy's needs.

    Args:
        max_bytes: stop adding entries beyond this many bytes of stored features (hits still work).
    """

    def __init__(self, max_bytes: int = 4 << 30) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._store: dict[bytes, dict[tuple[str, int], torch.Tensor]] = {}
        self._full_warned = False

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        """Forget every entry (the tower's weights changed)."""
        self._store.clear()
        self.bytes = 0

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
    ) -> VisionFeatures:
        """``compute(pixels (M, 3, H, W), pixels_hr)`` runs only on the images not cached yet;
        returns the features of all N images in order."""
        keys = [
            self._key(needs, pixel_values[i], None if pixel_values_hr is None else pixel_values_hr[i])
            for i in range(pixel_values.shape[0])
        ]
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh: dict[bytes, dict[tuple[str, int], torch.Tensor]] = {}
        if missing:
            idx = torch.tensor(missing, device=pixel_values.device)
            hr = None if pixel_values_hr is None else pixel_values_hr[idx]
            computed = compute(pixel_values[idx], hr)
            for row, i in enumerate(missing):
                entry = {(kind, layer): t[row].detach().clone() for kind, part in _parts(computed) for layer, t in part.items()}
                fresh[keys[i]] = entry
                self._remember(keys[i], entry)
        entries = [self._store.get(k) or fresh[k] for k in keys]
        out = VisionFeatures(layers={}, cls={}, high_res={})
        for kind, part in _parts(out):
            for kind_key, layer in entries[0]:
                if kind_key == kind:
                    part[layer] = torch.stack([e[(kind, layer)] for e in entries])
        return out

    def _remember(self, key: bytes, entry: dict[tuple[str, int], torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry.values())
        if self.bytes + size > self.max_bytes:
            if not self._full_warned:
                logger.warning("Vision feature cache is full (%.1f GiB); new images are no longer cached.", self.bytes / 2**30)
                self._full_warned = True
            return
        self._store[key] = entry
        self.bytes += size


def _parts(features: VisionFeatures) -> list[tuple[str, dict[int, torch.Tensor]]]:
    return [("layers", features.layers), ("cls", features.cls), ("high_res", features.high_res)]
