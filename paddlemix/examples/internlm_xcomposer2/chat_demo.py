"""Chat with InternLM-XComposer2 about images from the command line.

One image (``<ImageHere>`` marks where it goes; without the tag it follows the prompt, as officially)::

    python -m paddlemix.examples.internlm_xcomposer2.chat_demo --from_pretrained /path/to/internlm-xcomposer2-7b \\
        --image_path cat.png --text "<ImageHere>Please describe this image in detail." --stream

Several images, one tag per image, in order (paths or http(s) URLs); greedy decoding::

    python -m paddlemix.examples.internlm_xcomposer2.chat_demo --from_pretrained /path/to/ckpt --no-do_sample \\
        --image_path a.png --image_path https://example.com/b.jpg --text "Compare <ImageHere> with <ImageHere>."

Interactive multi-turn chat (``/image PATH``, ``/reset``, ``/help``, ``/exit``; stdin may be piped)::

    python -m paddlemix.examples.internlm_xcomposer2.chat_demo --from_pretrained /path/to/ckpt --interactive --stream

Weights from the Hugging Face Hub (or ``--source aistudio``)::

    python -m paddlemix.examples.internlm_xcomposer2.chat_demo --source huggingface \\
        --from_pretrained internlm/internlm-xcomposer2-7b --image_path cat.png --text "What is this?"
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from paddlemix.cli_utils import (DTYPES, HUB_SOURCES, add_logging_args, error_line, load_model, pick_device, pick_dtype,
                                 run_cli, setup_logging)

if TYPE_CHECKING:
    from PIL import Image

History = List[Tuple[str, str]]
IMAGE_TAG = "<ImageHere>"
REPL_HELP = """interactive commands:
  /image PATH   add an image (path or URL) for your next question
  /reset        forget the conversation and its images
  /help         show this help
  /exit         quit (as does end of input)"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Chat with InternLM-XComposer2 about images.", epilog=REPL_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from_pretrained", "--model_name_or_path", dest="from_pretrained",
                   default="internlm/internlm-xcomposer2-7b", help="checkpoint directory or hub id")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the model's)")
    p.add_argument("--image_path", action="append", default=[], help="image path or URL (repeatable)")
    p.add_argument("--text", help="the question (one-shot; with --interactive, the first question)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--interactive", action="store_true", help="multi-turn chat reading questions from stdin")
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--do_sample", action=argparse.BooleanOptionalAction, default=True,
                   help="sample (official default); --no-do_sample for greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=0.8)
    p.add_argument("--top_k", type=int, help="keep the k best tokens when sampling (default 50, as the official "
                   "generate; 0 disables)")
    p.add_argument("--repetition_penalty", type=float, default=1.005)
    p.add_argument("--seed", type=int, help="seed of each generation (reproducible sampling)")
    p.add_argument("--meta_instruction", help="system prompt (default: the official one; '' for none)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on a GPU, else float32")
    p.add_argument("--device", help="cpu, gpu, gpu:0, ... (default: gpu if available, else cpu)")
    p.add_argument("--source", choices=tuple(HUB_SOURCES), default="paddlenlp",
                   help="where to download hub ids from")
    p.add_argument("--cache_dir", help="download cache directory")
    add_logging_args(p)
    return p


class Chat:
    """One conversation: history, images so far, and how to answer with the CLI settings."""

    def __init__(self, model: Any, tokenizer: Any, args: argparse.Namespace, meta_instruction: str) -> None:
        self.model, self.tokenizer, self.stream = model, tokenizer, args.stream
        self.settings = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                             temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                             repetition_penalty=args.repetition_penalty, seed=args.seed,
                             meta_instruction=meta_instruction)
        self.reset()

    def reset(self) -> None:
        self.history: History = []
        self.images: List["Image.Image"] = []
        self.pending = 0  # images added since the last answered question

    def add_image(self, source: str) -> None:
        from paddlemix.models.internlm_xcomposer2.image_processing import load_image

        self.images.append(load_image(source))  # fails here (and adds nothing) if unusable
        self.pending += 1

    def ask(self, query: str) -> str:
        """Print and return the answer; the history grows only if the turn succeeded."""
        kwargs = dict(image=list(self.images) or None, history=self.history, **self.settings)
        response = ""
        if self.stream:  # the text only grows; print what is new
            for text, history in self.model.stream_chat(self.tokenizer, query, **kwargs):
                print(text[len(response):], end="", flush=True)
                response = text
        else:
            response, history = self.model.chat(self.tokenizer, query, **kwargs)
            print(response, end="")
        print(flush=True)
        self.history = history
        return response


def repl(chat: Chat, first: Optional[str]) -> None:
    """Questions from stdin until /exit or EOF; a failed turn reports one error line and goes on."""
    tty = sys.stdin.isatty()
    while True:
        if first is not None:
            line, first = first, None
        else:
            if tty:
                print("user> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                break
        line = line.strip()
        command, _, arg = line.partition(" ")
        if command in ("/exit", "/quit"):
            break
        try:
            if command == "/help":
                print(REPL_HELP, file=sys.stderr)
            elif command == "/reset":
                chat.reset()
                print("(new conversation)", file=sys.stderr)
            elif command == "/image":
                if not arg.strip(" '\""):
                    raise ValueError("usage: /image PATH_OR_URL")
                chat.add_image(arg.strip(" '\""))
                print(f"(image {len(chat.images)} added for your next question)", file=sys.stderr)
            elif command.startswith("/"):
                raise ValueError(f"unknown command {command!r}; type /help")
            elif line:
                chat.ask(IMAGE_TAG * chat.pending + line)
                chat.pending = 0
        except BrokenPipeError:  # stdout closed: stop (run_cli exits quietly)
            raise
        except (ValueError, OSError) as err:
            hint = "; type /reset to start over" if "max_length" in str(err) else ""  # conversation too long
            print(f"error: {error_line(err)}{hint}", file=sys.stderr, flush=True)


@run_cli
def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.text is None and not args.interactive:
        parser.error("give a question with --text, or chat with --interactive")
    setup_logging(args.verbose)
    from paddlemix.models.internlm_xcomposer2.processor import DEFAULT_META_INSTRUCTION

    meta = DEFAULT_META_INSTRUCTION if args.meta_instruction is None else args.meta_instruction
    dtype = pick_dtype(args.dtype, pick_device(args.device))
    from paddlemix.models.internlm_xcomposer2.image_processing import load_image

    images = [load_image(src) for src in args.image_path]  # a bad image fails before the slow model load
    model, tokenizer = load_model(args.from_pretrained, dtype, args.source, args.cache_dir, args.tokenizer,
                                  quiet=not args.verbose)
    chat = Chat(model, tokenizer, args, meta)
    chat.images = images
    if args.interactive:
        chat.pending = len(images)  # tagged before the first question, like /image
        repl(chat, args.text)
    else:
        chat.ask(args.text)  # tags as the user wrote them (one untagged image follows the prompt)
    return 0


if __name__ == "__main__":
    main()
