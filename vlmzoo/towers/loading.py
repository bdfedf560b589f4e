"""Loading one tower of a checkpoint that may hold two (CLIP / SigLIP: vision + text).

``CLIPVisionModel.from_pretrained(clip_dir)`` leaves the text tower's weights unused, and
transformers reports each of them in a load-report table; for a vision tower read from a full
CLIP checkpoint that is expected, and the table buries anything that is not. Here the other
tower's weights are counted in one log line, and a weight of the wanted tower missing from the
checkpoint is an error (it would otherwise start from random values).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from transformers.utils import logging as hf_logging

logger = logging.getLogger(__name__)


def load_tower(model_class: Any, name_or_path: str, what: str, **kwargs: Any) -> nn.Module:
    """``model_class.from_pretrained(name_or_path, **kwargs)``, checked: -> the model.

    Args:
        model_class: a transformers model class (e.g. ``CLIPVisionModel``).
        what: what the weights are, for messages (``"vision tower"``).
    """
    report_logger = hf_logging.get_logger("transformers.modeling_utils")
    level = report_logger.level
    report_logger.setLevel(logging.ERROR)  # its load report: replaced by the checks below
    try:
        model, info = model_class.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    finally:
        report_logger.setLevel(level)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(
            f"{name_or_path!r} lacks {what} weights {missing[:8]}{' ...' if len(missing) > 8 else ''} "
            f"({len(missing)} missing); is it a {model_class.__name__} checkpoint?"
        )
    unused = sorted(info.get("unexpected_keys") or [])
    if unused:
        logger.info("%s: %s loaded (%s); %d other weights of the checkpoint not used (e.g. %s)",
                    name_or_path, what, model_class.__name__, len(unused), unused[0])
    return model
