"""Merge a LoRA adapter into its base model and export a full checkpoint.

Usage::

    python paddlemix/tools/merge_lora_params.py --model_name_or_path /path/to/internlm-xcomposer2-7b \\
        --lora_path ./checkpoints/ixc2_lora_ckpts --output_dir ./checkpoints/ixc2_merged

The result loads with ``InternLMXComposer2ForCausalLM.from_pretrained`` and ``chat_demo.py``.
The LoRA delta is folded into each target linear's weight; the Partial-LoRA branch
(``Plora_A``/``Plora_B``, image rows only) cannot be folded and is kept as it is.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from paddlemix.cli_utils import DTYPES, add_logging_args, run_cli, setup_logging


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="base checkpoint (directory or hub id)")
    parser.add_argument("--lora_path", required=True, help="directory with lora_config.json + lora_model_state.pdparams")
    parser.add_argument("--output_dir", required=True, help="where to write the merged checkpoint")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the exported weights")
    parser.add_argument("--safe_serialization", action="store_true", help="write model.safetensors")
    add_logging_args(parser)
    return parser.parse_args(argv)


@run_cli
def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from paddlemix.finetune.lora import load_adapter, merge_and_unload
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM, InternLMXComposer2Tokenizer

    model = InternLMXComposer2ForCausalLM.from_pretrained(args.model_name_or_path, dtype=args.dtype)
    merged = merge_and_unload(load_adapter(model, args.lora_path))
    merged.save_pretrained(args.output_dir, safe_serialization=args.safe_serialization)
    InternLMXComposer2Tokenizer.from_pretrained(args.model_name_or_path).save_pretrained(args.output_dir)
    print(f"merged checkpoint written to {args.output_dir}")


if __name__ == "__main__":
    main()
