"""Names of the files in a checkpoint directory, in one place: the loader, the converter, the hub
resolver and the tokenizer all look for the same ones (and so import nothing from each other)."""
from __future__ import annotations

__all__ = ["CONFIG_NAME", "SAFE_WEIGHTS_NAME", "INDEX_SUFFIX", "WEIGHT_FILE_NAMES", "VOCAB_FILE_NAMES",
           "TOKENIZER_CONFIG", "SPECIAL_TOKENS_MAP", "TOKENIZER_FILES"]

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
INDEX_SUFFIX = ".index.json"  # a sharded checkpoint's index: <weights name>.index.json
# Looked for in this order; an index (sharded checkpoint) wins over a single file.
WEIGHT_FILE_NAMES = (SAFE_WEIGHTS_NAME, "model_state.pdparams", "pytorch_model.bin")
VOCAB_FILE_NAMES = ("tokenizer.model", "sentencepiece.bpe.model")  # official HF / PaddleMIX names
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TOKENIZER_FILES = (*VOCAB_FILE_NAMES, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
