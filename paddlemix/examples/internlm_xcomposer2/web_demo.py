"""A web chat with InternLM-XComposer2 (Gradio): images, multi-turn, streaming, regenerate/clear,
and the controls of the official demo.

On the model in this process::

    python paddlemix/examples/internlm_xcomposer2/web_demo.py --from_pretrained /path/to/internlm-xcomposer2-7b

Or on a running OpenAI-compatible server (``serve.py``, or any other)::

    python paddlemix/examples/internlm_xcomposer2/web_demo.py --api_base http://127.0.0.1:8000/v1

Then open http://127.0.0.1:7860.
"""
from __future__ import annotations

import argparse
import logging
from typing import List, Optional

from paddlemix.cli_utils import (DTYPES, HUB_SOURCES, add_logging_args, load_model, pick_device, pick_dtype, run_cli,
                                 setup_logging)
from paddlemix.serving.limits import DEFAULT_MAX_BATCH_SIZE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Web chat (Gradio) with InternLM-XComposer2.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("-m", "--from_pretrained", "--model_name_or_path", dest="from_pretrained",
                       help="checkpoint directory or hub id: run the model in this process")
    where.add_argument("--api_base", help="URL of a running OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api_key", help="the server's API key (default: $OPENAI_API_KEY)")
    p.add_argument("--model_name", help="model id (with --api_base: default the server's first model)")
    p.add_argument("--host", default="127.0.0.1", help="address of the page (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--meta_instruction", help="default system prompt (default: the official one; '' for none)")
    p.add_argument("--max_batch_size", type=int, default=DEFAULT_MAX_BATCH_SIZE, help="in-process: visitors decoded together at most")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on a GPU, else float32")
    p.add_argument("--device", help="cpu, gpu, gpu:0, ... (default: gpu if available, else cpu)")
    p.add_argument("--source", choices=tuple(HUB_SOURCES), default="paddlenlp",
                   help="where to download hub ids from")
    p.add_argument("--cache_dir", help="download cache directory")
    add_logging_args(p)
    return p


@run_cli
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("paddlemix.serving").setLevel(logging.INFO)
    from paddlemix.models.internlm_xcomposer2.processor import DEFAULT_META_INSTRUCTION
    from paddlemix.serving.web import build_demo, launch
    from paddlemix.serving.web_backends import EngineBackend, OpenAIBackend

    system = DEFAULT_META_INSTRUCTION if args.meta_instruction is None else args.meta_instruction
    if args.api_base:
        backend = OpenAIBackend(args.api_base, args.api_key, args.model_name)
    else:
        from paddlemix.serving.engine import Engine
        from paddlemix.serving.runner import default_model_name

        dtype = pick_dtype(args.dtype, pick_device(args.device))
        model, tokenizer = load_model(args.from_pretrained, dtype, args.source, args.cache_dir, quiet=not args.verbose)
        name = args.model_name or default_model_name(args.from_pretrained)
        backend = EngineBackend(Engine(model, tokenizer, max_batch_size=args.max_batch_size).start(), name)
    print(f"web chat on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    launch(build_demo(backend, system), args.host, args.port)
    return 0


if __name__ == "__main__":
    main()
