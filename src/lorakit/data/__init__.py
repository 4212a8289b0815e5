"""lorakit.data: from a data file to the batches the trainer consumes.

records (read files) -> formats (validate, normalise) -> templates (render, tokenize, loss mask)
-> prepare (length policy, summary) -> packing / collate (rows, padding, batch order).
Imports torch and, lazily, pyarrow / datasets; never `lorakit.lora`.
"""

from .collate import LengthGroupedBatchSampler, collate, collate_packed
from .formats import FORMATS, ToolCall, Turn, chat_tools, detect_format, normalise
from .options import DataOptions
from .packing import PackedRow, block_causal_mask, pack
from .prepare import DataSummary, Example, PreparedData, iter_batches, packed_rows, prepare, split_validation
from .records import BadRecord, Record, read_hub, read_records
from .templates import BUILTIN_TEMPLATES, IGNORE_INDEX, ChatTemplate, Tokenized, resolve_template, \
    tokenize_conversation, tokenize_text

__all__ = [
    "BUILTIN_TEMPLATES",
    "FORMATS",
    "IGNORE_INDEX",
    "BadRecord",
    "ChatTemplate",
    "DataOptions",
    "DataSummary",
    "Example",
    "LengthGroupedBatchSampler",
    "PackedRow",
    "PreparedData",
    "Record",
    "Tokenized",
    "ToolCall",
    "Turn",
    "block_causal_mask",
    "chat_tools",
    "collate",
    "collate_packed",
    "detect_format",
    "iter_batches",
    "normalise",
    "pack",
    "packed_rows",
    "prepare",
    "read_hub",
    "read_records",
    "resolve_template",
    "split_validation",
    "tokenize_conversation",
    "tokenize_text",
]
