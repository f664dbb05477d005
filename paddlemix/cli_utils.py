"""Helpers shared by the command-line tools (chat demo, server, composition, evaluation,
fine-tuning): logging, device and dtype choice, loading a checkpoint (:func:`load_model`), and
:func:`run_cli`, which turns expected failures into one ``error: ...`` line.

Nothing here imports Paddle at module level, so a CLI can parse its arguments (and answer
``--help``) before paying for the framework import. Library modules log; only CLIs print.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import re
import sys
import warnings
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from paddlemix.cpu_env import configure_cpu_environment, describe_applied

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "DTYPES",
    "add_logging_args",
    "setup_logging",
    "error_line",
    "warn",
    "run_cli",
    "gpu_available",
    "pick_device",
    "pick_dtype",
    "looks_like_hub_id",
    "quiet_native_stderr",
    "HUB_SOURCES",
    "load_model",
]

EXIT_ERROR = 2  # bad input; the same code argparse uses for usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
DTYPES = ("float32", "bfloat16", "float16")
# Import-time noise of Paddle/setuptools that says nothing about the user's run.
_NOISY_WARNINGS = ("No ccache found", "Setuptools is replacing distutils")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# --source choices → from_pretrained keyword arguments
HUB_SOURCES: Dict[str, Dict[str, Any]] = {"paddlenlp": {}, "aistudio": {"from_aistudio": True},
                                          "huggingface": {"from_hf_hub": True}}
logger = logging.getLogger("paddlemix.cli")


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO); default: warnings only")


def setup_logging(verbose: bool = False) -> None:
    """Root logging to stderr at WARNING (INFO with ``verbose``); silence known import noise.

    Imports PaddleNLP (and thereby Paddle) with those warnings filtered, because PaddleNLP
    resets its own logger to DEBUG when imported; its level is set afterwards.
    """
    level = logging.INFO if verbose else logging.WARNING
    for message in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    applied = describe_applied()
    if applied:
        logging.getLogger("paddlemix.cpu_env").info(applied)
    from paddlenlp.utils.log import logger as paddlenlp_logger

    paddlenlp_logger.set_level("INFO" if verbose else "WARNING")


def error_line(err: BaseException) -> str:
    """``err`` as one line: its message with line breaks collapsed (or its type name)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


def warn(message: str) -> None:
    """A warning for the user of a command line (logged: :func:`setup_logging` shows warnings)."""
    logger.warning(message)


def run_cli(main: Callable[..., Optional[int]]) -> Callable[..., None]:
    """Decorate a CLI ``main``: first the CPU-vendor settings that must precede Paddle's import
    (:mod:`paddlemix.cpu_env`); then exit with its return value; bad input (``ValueError``,
    ``OSError``, including every library error type) → ``error: <message>`` on stderr and
    exit 2; Ctrl-C → exit 130 quietly. Anything else is a bug and keeps its traceback."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        configure_cpu_environment()
        try:
            code = main(*args, **kwargs)
        except KeyboardInterrupt:
            sys.stdout.flush()
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:  # e.g. piped into `head`: not an error of the run
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except (ValueError, OSError) as err:
            sys.stdout.flush()
            print(f"error: {error_line(err)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_ERROR)
        sys.exit(code or 0)

    return wrapper


def gpu_available() -> bool:
    import paddle

    return bool(paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0)


def pick_device(requested: Optional[str] = None) -> str:
    """Set Paddle's device: ``requested`` (``cpu``, ``gpu``, ``gpu:0``, ...) or the GPU if
    there is one, else the CPU. Returns the device in use. Invalid devices raise ValueError."""
    import paddle

    device = requested or ("gpu" if gpu_available() else "cpu")
    paddle.set_device(device)
    return paddle.device.get_device()


def pick_dtype(requested: Optional[str], device: str) -> str:
    """``requested`` or, by default, bfloat16 on a GPU and float32 on the CPU. bfloat16 and
    float16 on the CPU fall back to float32 with one warning (no CPU compute kernels)."""
    if requested is not None and requested not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
    on_cpu = device.startswith("cpu")
    if requested is None:
        return "float32" if on_cpu else "bfloat16"
    if on_cpu and requested != "float32":
        warn(f"the CPU has no {requested} compute kernels for this model; using float32")
        return "float32"
    return requested


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` that is not an existing local path (so it would have to be downloaded)."""
    return not os.path.exists(name) and bool(_HUB_ID.match(name))


def load_model(path_or_id: str, dtype: str = "float32", source: str = "paddlenlp", cache_dir: Optional[str] = None,
               tokenizer: Optional[str] = None, quiet: bool = True) -> Tuple[Any, Any]:
    """``(model, tokenizer)`` of a local checkpoint or hub id (``source``: a :data:`HUB_SOURCES`
    key), the model in eval mode; ``tokenizer``: another directory or id for the tokenizer. A hub
    id that cannot be resolved (offline, typo) is one error that says what to pass instead.
    ``quiet`` hides SentencePiece's harmless load-time chatter on the native stderr."""
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM, InternLMXComposer2Tokenizer

    if source not in HUB_SOURCES:
        raise ValueError(f"source must be one of {', '.join(HUB_SOURCES)}, got {source!r}")
    hub = dict(HUB_SOURCES[source], **({"cache_dir": cache_dir} if cache_dir else {}))
    name = tokenizer or path_or_id
    try:
        with quiet_native_stderr(quiet):
            loaded_tokenizer = InternLMXComposer2Tokenizer.from_pretrained(name, **hub)
        name = path_or_id
        model = InternLMXComposer2ForCausalLM.from_pretrained(name, dtype=dtype, **hub)
    except (ValueError, OSError) as err:
        if not looks_like_hub_id(name):
            raise
        raise ValueError(f"could not load {name!r}: {error_line(err).rstrip('.')}. Pass a local checkpoint "
                         "directory with --from_pretrained /path/to/dir") from err
    return model.eval(), loaded_tokenizer


@contextlib.contextmanager
def quiet_native_stderr(enabled: bool = True) -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block (for chatter of C++ libraries such
    as SentencePiece's load-time warnings). Python exceptions still propagate normally."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # no real stderr (e.g. captured in-process)
        fd = -1
    if not enabled or fd < 0:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)
