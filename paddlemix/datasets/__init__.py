"""Training data: ChatML conversation files → validated samples → padded batches."""
from .chatml_dataset import (
    ChatMLDataset,
    DatasetError,
    Issue,
    Sample,
    ValidationReport,
    apply_policy,
    read_chatml,
    validate,
)
from .collator import DataCollatorForChatML

__all__ = [
    "ChatMLDataset",
    "DataCollatorForChatML",
    "DatasetError",
    "Issue",
    "Sample",
    "ValidationReport",
    "apply_policy",
    "read_chatml",
    "validate",
]
