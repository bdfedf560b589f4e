"""``scripts/merge_lora.py``: a run folder (or model folder) whose model carries a LoRA adapter ->
a plain vlmzoo model folder with the adapter merged into the weights, which ``from_pretrained``
loads without peft.

    python scripts/merge_lora.py outputs/llava-tiny_lora-XXXX --output llava-lora-merged
    python scripts/merge_lora.py outputs/RUN/stage2_instruct/final --output OUT --dtype bfloat16

A run folder means its last stage's ``final/`` (stage order from its ``resolved_config.yaml``).
The merge runs in float32 whatever ``--dtype`` the output is written in.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import torch
import yaml

from . import lora
from .build import torch_dtype
from .modeling import VLMForConditionalGeneration
from .processing import VLMProcessor
from .utils import cli_entry

logger = logging.getLogger(__name__)


def model_folder(path: str | Path) -> Path:
    """``path`` if it is a model folder; for a run folder, its last stage's ``final/``."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    resolved = path / "resolved_config.yaml"
    if not resolved.is_file():
        raise FileNotFoundError(f"{path}: neither a model folder (config.json) nor a run folder (resolved_config.yaml).")
    stages = ((yaml.safe_load(resolved.read_text()) or {}).get("training") or {}).get("stages") or []
    if not stages:
        raise ValueError(f"{resolved}: training.stages is empty.")
    final = path / stages[-1]["name"] / "final"
    if not (final / "stage_complete.json").is_file():
        raise FileNotFoundError(f"{path}: its last stage {stages[-1]['name']!r} is not complete ({final}).")
    return final


def merge_folder(src: str | Path, output: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Load ``src`` (a run or model folder) with its adapter, merge it, save model + processor to
    ``output``; -> the model folder read. Errors: no adapter to merge, ``output`` not empty."""
    folder = model_folder(src)
    if lora.saved_adapter_dir(folder) is None:
        raise ValueError(f"{folder} holds no LoRA adapter ({lora.ADAPTER_DIRNAME}/): it already is a plain model folder.")
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose another --output or pass --overwrite.")
        shutil.rmtree(out)
    model = VLMForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    merged = lora.merge_adapter(model)
    logger.info("Merged the adapter of %s into %d modules.", folder, merged)
    model = model.to(torch_dtype(dtype))
    model.save_pretrained(out)
    VLMProcessor.from_pretrained(folder).save_pretrained(out)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`: "))
    parser.add_argument("source", help="run folder, or a model folder (e.g. <run>/<stage>/final) with a lora/ adapter")
    parser.add_argument("--output", required=True, help="folder to write the merged model into")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written weights (default: float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folder = merge_folder(args.source, args.output, args.dtype, args.overwrite)
    print(f"merged {folder} -> {args.output} (loads without peft)")
    return 0


if __name__ == "__main__":
    sys.exit(cli_entry(main))
