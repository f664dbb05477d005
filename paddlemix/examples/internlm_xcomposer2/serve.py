"""Serve InternLM-XComposer2 over an OpenAI-compatible HTTP API (``/v1/chat/completions``).

    python paddlemix/examples/internlm_xcomposer2/serve.py --from_pretrained /path/to/internlm-xcomposer2-7b \\
        --host 127.0.0.1 --port 8000

Then any OpenAI client talks to it (``base_url="http://127.0.0.1:8000/v1"``, model: the
checkpoint's directory name unless ``--model_name``). Requests that arrive together are decoded
together (``--max_batch_size``); a full queue (``--max_queue``) answers 429 at once.
"""
from __future__ import annotations

import argparse
import logging
from typing import List, Optional

from paddlemix.cli_utils import (DTYPES, HUB_SOURCES, add_logging_args, load_model, pick_device, pick_dtype, run_cli,
                                 setup_logging)
from paddlemix.serving.limits import (DEFAULT_BATCH_WAIT, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_BODY_BYTES,
                                      DEFAULT_MAX_IMAGES, DEFAULT_MAX_QUEUE, DEFAULT_PORT, MIB)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="OpenAI-compatible API server for InternLM-XComposer2.")
    p.add_argument("-m", "--from_pretrained", "--model_name_or_path", dest="from_pretrained", required=True,
                   help="checkpoint directory or hub id")
    p.add_argument("--model_name", help="the model id clients send (default: the checkpoint's directory name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--api-keys", "--api_keys", dest="api_keys", nargs="+", default=[], metavar="KEY",
                   help="accept only requests with 'Authorization: Bearer KEY' (default: no authentication)")
    p.add_argument("--max_batch_size", type=int, default=DEFAULT_MAX_BATCH_SIZE, help="requests decoded together at most")
    p.add_argument("--max_queue", type=int, default=DEFAULT_MAX_QUEUE, help="requests waiting at most; more get 429")
    p.add_argument("--batch_wait_ms", type=float, default=DEFAULT_BATCH_WAIT * 1000,
                   help="how long the oldest waiting request waits for others to share its batch")
    p.add_argument("--max_images", type=int, default=DEFAULT_MAX_IMAGES, help="images per conversation at most")
    p.add_argument("--max_request_mb", type=float, default=DEFAULT_MAX_BODY_BYTES / MIB,
                   help="request bodies larger than this many MiB are refused with 413")
    p.add_argument("--max_image_pixels", type=int, help="width x height limit of an image (default 8192x8192)")
    p.add_argument("--allowed-local-media-path", "--allowed_local_media_path", dest="allowed_local_media_path",
                   help="allow image URLs that are local paths (or file://) inside this directory")
    p.add_argument("--allow-private-media-urls", "--allow_private_media_urls", dest="allow_private_media_urls",
                   action="store_true", help="also fetch image URLs of loopback and private-network hosts (by "
                   "default only public hosts: a client must not make the server read its own network)")
    p.add_argument("--cpu_weight_packing", choices=("auto", "on", "off"), default="auto",
                   help="copy the decode weights into oneDNN's packed layout, so a CPU decode step of a batch "
                        "reads each weight once (auto: float32 on a CPU, batches > 1, if the copy fits in memory)")
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
    if args.max_request_mb <= 0:  # before the (slow) model load
        raise ValueError(f"--max_request_mb must be positive, got {args.max_request_mb}")
    setup_logging(args.verbose)
    logging.getLogger("paddlemix.serving").setLevel(logging.INFO)  # one line per request, always
    from paddlemix.serving.media import MediaLoader
    from paddlemix.serving.runner import build_server, default_model_name, uvicorn_config

    media_args = {"max_pixels": args.max_image_pixels} if args.max_image_pixels else {}
    media = MediaLoader(args.allowed_local_media_path, allow_private_urls=args.allow_private_media_urls, **media_args)
    dtype = pick_dtype(args.dtype, pick_device(args.device))
    model, tokenizer = load_model(args.from_pretrained, dtype, args.source, args.cache_dir, quiet=not args.verbose)
    name = args.model_name or default_model_name(args.from_pretrained)
    app, engine = build_server(model, tokenizer, name, api_keys=args.api_keys, max_batch_size=args.max_batch_size,
                               max_queue=args.max_queue, max_images=args.max_images,
                               batch_wait=args.batch_wait_ms / 1000, media=media,
                               max_body_bytes=int(args.max_request_mb * MIB),
                               weight_packing=args.cpu_weight_packing)
    import uvicorn

    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", flush=True)
    try:
        uvicorn.Server(uvicorn_config(app, args.host, args.port, log_level="info")).run()
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    main()
