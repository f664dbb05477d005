"""Fine-tune InternLM-XComposer2 (full or LoRA) with the PaddleNLP Trainer.

Usage::

    python paddlemix/tools/supervised_finetune.py paddlemix/config/internlm_xcomposer2/sft_argument.json
    python paddlemix/tools/supervised_finetune.py paddlemix/config/internlm_xcomposer2/sft_lora_argument.json \\
        --model_name_or_path /path/to/internlm-xcomposer2-7b --output_dir ./checkpoints/lora
    python -m paddle.distributed.launch --gpus 0,1,2,3 paddlemix/tools/supervised_finetune.py sft_argument.json

The JSON file holds model, data and ``paddlenlp.trainer.TrainingArguments`` keys; flags after
it override them. Rerunning the same command after an interruption resumes from the last
complete checkpoint in ``output_dir`` (unless ``overwrite_output_dir``).
"""
from __future__ import annotations

import logging
import sys
from typing import List, Optional

from paddlemix.cli_utils import run_cli, setup_logging
from paddlemix.cpu_env import configure_allocator


@run_cli
def main(argv: Optional[List[str]] = None) -> None:
    configure_allocator()  # training re-allocates its large tensors every step (see paddlemix/cpu_env.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    setup_logging(verbose)
    logging.getLogger("paddlemix").setLevel(logging.INFO)  # progress lines (loss, lr) are the point of a run
    from paddlemix.finetune.arguments import parse_arguments
    from paddlemix.finetune.process_exit import exit_finished_distributed_run
    from paddlemix.finetune.run import run_sft

    model_args, data_args, training_args = parse_arguments(argv)
    run_sft(model_args, data_args, training_args)
    if training_args.world_size > 1:
        exit_finished_distributed_run()


if __name__ == "__main__":
    main()
