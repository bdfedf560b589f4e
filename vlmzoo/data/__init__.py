"""Data: conversation templates, LLaVA-format JSON loading, collation."""

from .llava_json import LlavaJsonDataset, VLMDataCollator
from .records import LlavaDataError, SkippedRecord, iter_json_records, normalize_record, read_llava_records
from .supervision import TokenizationMismatchError, check_supervision
from .templates import (
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    ConversationTemplate,
    EncodedConversation,
    ImageTruncationError,
    Segment,
    TemplateEncoder,
    available_templates,
    encode_conversation,
    get_template,
)

__all__ = [
    "DEFAULT_IMAGE_TOKEN",
    "IGNORE_INDEX",
    "ConversationTemplate",
    "EncodedConversation",
    "ImageTruncationError",
    "LlavaDataError",
    "LlavaJsonDataset",
    "Segment",
    "SkippedRecord",
    "TemplateEncoder",
    "TokenizationMismatchError",
    "VLMDataCollator",
    "available_templates",
    "check_supervision",
    "encode_conversation",
    "get_template",
    "iter_json_records",
    "normalize_record",
    "read_llava_records",
]
