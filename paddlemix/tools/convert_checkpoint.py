"""Convert an InternLM-XComposer2 checkpoint (official HF ``pytorch_model.bin`` / safetensors /
shards, or a PaddleMIX ``model_state.pdparams``) into this project's format: our parameter
names, Paddle ``[in, out]`` Linear layout, sharded ``model*.safetensors``.

Usage::

    python paddlemix/tools/convert_checkpoint.py --src /path/to/internlm-xcomposer2-7b \\
        --dst ./internlm-xcomposer2-7b-paddle [--dtype bfloat16] [--max_shard_size_gb 2]

Optional: ``from_pretrained`` reads all those layouts directly. Converting once makes later
loads faster (no zip parsing, no transposes) and needs about one shard of memory — the 17 GB
single-file 7B converts on a machine much smaller than the model.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from paddlemix.cli_utils import DTYPES, add_logging_args, run_cli, setup_logging


@run_cli
def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="checkpoint directory to convert")
    parser.add_argument("--dst", required=True, help="output directory")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast (default: keep the stored dtype)")
    parser.add_argument("--max_shard_size_gb", type=float, default=2.0, help="shard size (memory needed ~ one shard)")
    add_logging_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from paddlemix.models.internlm_xcomposer2.convert import convert_checkpoint

    files = convert_checkpoint(args.src, args.dst, args.dtype, int(args.max_shard_size_gb * 1024**3))
    print(f"wrote {len(files)} weight file(s) and config.json to {args.dst}")


if __name__ == "__main__":
    main()
