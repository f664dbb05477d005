"""The web chat (Gradio): images (several per turn), multi-turn history, streamed answers,
regenerate and clear, and the controls of the official ``gradio_demo_chat.py``.

Official controls and their defaults: max output tokens 512 (slider up to 1024), beam size 1
(1–5), repetition penalty 1.005 (1–2), do_sample on; temperature (1.0) and top-p (0.8) as the
official ``chat()``'s, plus a system prompt (the official meta instruction) and a seed. Answers
come from a backend (:mod:`.web_backends`): the engine in this process or a running server.

API names (for ``gradio_client``): ``/chat`` (message, then the controls), ``/regenerate``, ``/clear``.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import gradio as gr

from .web_backends import ChatError, Turn, build_messages

logger = logging.getLogger(__name__)

__all__ = ["OFFICIAL_UI_DEFAULTS", "RANDOM_SEED", "build_demo", "launch", "request_params"]

# gradio_demo_chat.py: max output tokens 512 (0–1024), beams 1 (1–5), repetition penalty 1.005 (1–2),
# do_sample True; temperature and top_p are chat()'s defaults.
OFFICIAL_UI_DEFAULTS = dict(max_tokens=512, num_beams=1, repetition_penalty=1.005, do_sample=True, temperature=1.0,
                            top_p=0.8)
MAX_OUTPUT_TOKENS, MAX_BEAMS = 1024, 5
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page works offline
TYPING = "▌"  # shown after the answer while it streams, as the official demo does
TITLE = "InternLM-XComposer2 (paddlemix)"
RANDOM_SEED = -1  # the seed control's "no seed" (a number box cannot stay empty)


def request_params(max_tokens: float, num_beams: float, repetition_penalty: float, do_sample: bool,
                   temperature: float, top_p: float, seed: Optional[float]) -> Dict[str, Any]:
    """The controls as OpenAI request fields (the non-standard ones go in the extra body)."""
    params: Dict[str, Any] = dict(max_tokens=int(max_tokens), repetition_penalty=float(repetition_penalty),
                                  do_sample=bool(do_sample), temperature=float(temperature), top_p=float(top_p))
    if int(num_beams) > 1:  # the slider is labelled "greedy only": beams override the sampling box
        params["num_beams"] = int(num_beams)
        params["do_sample"] = False
    if seed is not None and int(seed) != RANDOM_SEED:
        params["seed"] = int(seed)
    return params


def _display(turns: Sequence[Turn], streaming: Optional[str] = None) -> List[Dict[str, Any]]:
    """Chatbot messages: each turn's images and text, then its answer (or the one streaming in)."""
    shown: List[Dict[str, Any]] = []
    for i, turn in enumerate(turns):
        content: List[Any] = [{"path": path} for path in turn["images"]] + ([turn["text"]] if turn["text"] else [])
        shown.append({"role": "user", "content": content})
        answer = turn["answer"] if i < len(turns) - 1 or streaming is None else streaming + TYPING
        if answer is not None:
            shown.append({"role": "assistant", "content": answer})
    return shown


class ChatUI:
    """The page's event handlers over one backend; the conversation lives in a ``gr.State``."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def _answer(self, turns: List[Turn], system: str, controls: Tuple[Any, ...]) -> Iterator[Tuple[Any, List[Turn]]]:
        """Stream the answer to the last turn: ``(chatbot messages, turns)`` as it grows."""
        messages = build_messages(turns, system)
        answer = ""
        yield _display(turns, answer), turns
        try:
            for delta in self.backend.stream(messages, request_params(*controls)):
                answer += delta
                yield _display(turns, answer), turns
        except ChatError as err:
            kept = turns[:-1]  # the turn that failed is not kept: ask again
            yield _display(kept), kept
            raise gr.Error(str(err)) from err
        done = turns[:-1] + [dict(turns[-1], answer=answer)]
        yield _display(done), done

    def chat(self, message: Optional[Dict[str, Any]], turns: List[Turn], system: str, *controls: Any):
        text, files = (message or {}).get("text") or "", list((message or {}).get("files") or [])
        if not text.strip() and not files:
            raise gr.Error("Type a question or add an image first.")
        turns = list(turns) + [{"images": files, "text": text, "answer": None}]
        for shown, now in self._answer(turns, system, controls):
            yield shown, None, now

    def regenerate(self, turns: List[Turn], system: str, *controls: Any):
        if not turns:
            raise gr.Error("Nothing to regenerate yet.")
        turns = list(turns[:-1]) + [dict(turns[-1], answer=None)]
        yield from self._answer(turns, system, controls)

    @staticmethod
    def clear() -> Tuple[List[Any], None, List[Turn]]:
        return [], None, []


def _controls() -> List[Any]:
    d = OFFICIAL_UI_DEFAULTS
    return [gr.Slider(1, MAX_OUTPUT_TOKENS, value=d["max_tokens"], step=1, label="Max output tokens"),
            gr.Slider(1, MAX_BEAMS, value=d["num_beams"], step=1, label="Beam size (greedy only)"),
            gr.Slider(1.0, 2.0, value=d["repetition_penalty"], step=0.001, label="Repetition penalty"),
            gr.Checkbox(value=d["do_sample"], label="Do sample"),
            gr.Slider(0.05, 2.0, value=d["temperature"], step=0.05, label="Temperature"),
            gr.Slider(0.05, 1.0, value=d["top_p"], step=0.05, label="Top-p"),
            gr.Number(value=RANDOM_SEED, precision=0, label=f"Seed ({RANDOM_SEED}: a new draw each time)")]


def build_demo(backend: Any, system: str, title: str = TITLE) -> gr.Blocks:
    """The chat page over ``backend`` (``stream(messages, params)`` yielding text deltas)."""
    ui = ChatUI(backend)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        turns = gr.State([])
        gr.Markdown(f"## {title}\nAdd images with the clip (several per question), ask, press Enter. "
                    "Images go before the question, in upload order.")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Accordion("Parameters", open=True):
                    controls = _controls()
                system_box = gr.Textbox(value=system, lines=4, label="System prompt (empty: none)")
            with gr.Column(scale=7):
                chatbot = gr.Chatbot(elem_id="chatbot", height=480, label="Chat")
                box = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", show_label=False,
                                           placeholder="Enter text and press ENTER", elem_id="chat-input")
                with gr.Row():
                    regenerate = gr.Button("Regenerate")
                    clear = gr.Button("Clear history")
        inputs = [system_box, *controls]
        box.submit(ui.chat, [box, turns, *inputs], [chatbot, box, turns], api_name="chat")
        regenerate.click(ui.regenerate, [turns, *inputs], [chatbot, turns], api_name="regenerate")
        clear.click(ui.clear, None, [chatbot, box, turns], api_name="clear")
    return demo


def launch(demo: gr.Blocks, host: str, port: int, block: bool = True) -> gr.Blocks:
    """Serve the page (offline: system fonts, no server-side rendering, no share link)."""
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"])
    demo.queue().launch(server_name=host, server_port=port, show_error=True, ssr_mode=False, theme=theme,
                        prevent_thread_lock=not block, quiet=not block)
    return demo
