"""Write an illustrated article with InternLM-XComposer2, offline, with images from your own folder.

The article streams to the terminal as it is written; then the model chooses where images go,
writes a caption for each place, ranks the images of ``--library`` for it and picks one::

    python paddlemix/examples/internlm_xcomposer2/compose.py --from_pretrained internlm/internlm-xcomposer2-7b \\
        --source huggingface --instruction "写一篇介绍西湖四季风景的文章。" --library ~/Pictures/hangzhou \\
        --num_images 4 --out west_lake/article.md --html

Your own images for the model to use and place (as the official demo's uploads; at most 10)::

    python -m paddlemix.examples.internlm_xcomposer2.compose --from_pretrained /path/to/ckpt \\
        --instruction "Write a travel diary of my trip." --image day1.jpg day2.jpg --out diary/article.md

The library's image features are cached (``<library>/.ixc2_cache`` or ``--cache_dir``): a second
article over the same folder encodes only new or changed files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Union

from paddlemix.cli_utils import (DTYPES, HUB_SOURCES, add_logging_args, load_model, pick_device, pick_dtype, run_cli,
                                 setup_logging, warn)


def num_images_arg(value: str) -> Union[str, int]:
    if value.strip().lower() in ("auto", "automatic"):
        return "auto"
    if value.strip().isdigit():
        return int(value)
    raise argparse.ArgumentTypeError(f"expected 'auto' or a number of images, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write an illustrated article (Markdown, optionally HTML) with "
                                "InternLM-XComposer2, placing images from your own files.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from_pretrained", "--model_name_or_path", dest="from_pretrained",
                   default="internlm/internlm-xcomposer2-7b", help="checkpoint directory or hub id")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the model's)")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--instruction", help="what to write: topic, outline, requirements, material")
    text.add_argument("--instruction_file", help="read the instruction from this UTF-8 file")
    p.add_argument("--image", action="extend", nargs="+", default=[], metavar="PATH",
                   help="your own image(s) for the article, placed where the model chooses (at most 10)")
    p.add_argument("--library", help="folder of jpg/png/webp images (searched recursively) to illustrate from")
    p.add_argument("--cache_dir", help="where library image features are cached (default: <library>/.ixc2_cache)")
    p.add_argument("--num_images", type=num_images_arg, default="auto",
                   help="'auto' (default) or a number; 0 = text only")
    p.add_argument("--out", required=True, help="Markdown file to write; images are copied to images/ beside it")
    p.add_argument("--html", action="store_true", help="also write the article as a standalone .html page")
    p.add_argument("--json", action="store_true", help="also write .json: slots, candidates, scores, timings")
    # Defaults left as None are the library's (ComposeOptions: the official demo's values).
    p.add_argument("--max_new_tokens", type=int, help="article length budget (default: the official 4096)")
    p.add_argument("--do_sample", action=argparse.BooleanOptionalAction, default=True,
                   help="sample as the official demo (default); --no-do_sample makes every step greedy")
    p.add_argument("--repetition_penalty", type=float, help="of the article step (default: the official 1.005)")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--with_meta", action="store_true", help="add the demo's system prompt to every step")
    p.add_argument("--num_candidates", type=int, help="library images shown to the model per place (default: the "
                   "demo's 4)")
    p.add_argument("--batch_size", type=int, help="images per batch when encoding and ranking (default 8)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on a GPU, else float32")
    p.add_argument("--device", help="cpu, gpu, gpu:0, ... (default: gpu if available, else cpu)")
    p.add_argument("--source", choices=tuple(HUB_SOURCES), default="paddlenlp",
                   help="where to download hub ids from")
    p.add_argument("--download_dir", help="download cache directory for hub ids")
    add_logging_args(p)
    return p


def read_instruction(args: argparse.Namespace) -> str:
    text = args.instruction
    if args.instruction_file:
        path = Path(args.instruction_file)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not text.strip():
        raise ValueError("the instruction is empty; say what to write")
    return text


def check_inputs(args: argparse.Namespace) -> None:
    """Fail on bad files before the (slow) model load."""
    from paddlemix.composition.prompts import MAX_UPLOADS
    from paddlemix.models.internlm_xcomposer2.image_processing import load_image

    for path in args.image:
        load_image(path)
    if args.library and not Path(args.library).is_dir():
        raise ValueError(f"--library {args.library!r} is not a directory")
    if len(args.image) > MAX_UPLOADS:
        raise ValueError(f"{len(args.image)} --image given; at most {MAX_UPLOADS} (as the official demo)")
    if any(value is not None and value < 1 for value in (args.num_candidates, args.batch_size, args.max_new_tokens)):
        raise ValueError("--num_candidates, --batch_size and --max_new_tokens must be positive")


def report(article, written: List[Path]) -> None:
    """What happened, on stderr (stdout holds the article text)."""
    lib = article.library
    if lib:
        rate = lib["encoded"] / lib["encode_seconds"] if lib["encoded"] and lib["encode_seconds"] else None
        speed = f" ({rate:.1f} images/s)" if rate else ""
        print(f"library: {lib['images']} images, {lib['encoded']} encoded{speed}, {lib['cache_hits']} from the cache "
              f"({lib['cache']})", file=sys.stderr)
        if lib["skipped"]:  # each one was logged, with its reason, when the library was opened
            warn(f"{len(lib['skipped'])} unreadable library image(s) skipped: "
                 + ", ".join(item["path"] for item in lib["skipped"]))
    for slot in article.slots:
        print(f"image after paragraph {slot.paragraph}: {slot.path}" + (f"  ({slot.caption})" if slot.caption else ""),
              file=sys.stderr)
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in article.timings.items())
    print(f"{len(article.paragraphs)} paragraphs, {len(article.slots)} images; {steps}", file=sys.stderr)
    documents = [str(p) for p in written if p.suffix in (".md", ".html", ".json")]
    print(f"wrote {', '.join(documents)} and {len(written) - len(documents)} image(s) beside them", file=sys.stderr)


class Console:
    """The article on stdout as it is written; progress on stderr, never in the middle of a line."""

    def __init__(self) -> None:
        self.mid_line = False

    def text(self, piece: str) -> None:
        print(piece, end="", flush=True)
        self.mid_line = not piece.endswith("\n")

    def event(self, message: str) -> None:
        if self.mid_line:
            print(flush=True)
            self.mid_line = False
        print(f"[compose] {message}", file=sys.stderr, flush=True)


@run_cli
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    instruction = read_instruction(args)
    setup_logging(args.verbose)
    check_inputs(args)
    dtype = pick_dtype(args.dtype, pick_device(args.device))
    from paddlemix.composition import compose, save_article

    model, tokenizer = load_model(args.from_pretrained, dtype, args.source, args.download_dir, args.tokenizer,
                                  quiet=not args.verbose)
    console = Console()
    chosen = {name: getattr(args, name) for name in ("max_new_tokens", "repetition_penalty", "num_candidates",
                                                     "batch_size") if getattr(args, name) is not None}
    article = compose(model, tokenizer, instruction, images=args.image or None, library=args.library,
                      num_images=args.num_images, cache_dir=args.cache_dir, do_sample=args.do_sample, seed=args.seed,
                      with_meta=args.with_meta, on_text=console.text, on_event=console.event, **chosen)
    console.event("saving")
    written = save_article(article, args.out, html_page=args.html, json_file=args.json)
    report(article, written)
    return 0


if __name__ == "__main__":
    main()
