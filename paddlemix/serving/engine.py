"""The batcher: one worker thread owns the model and decodes waiting requests together.

Requests that arrive together share one generation (``generate_rows``: each prompt prefilled
alone, then the rows decoded together as a left-padded batch, the path of ``batch_chat``, whose
greedy results equal ``chat`` one by one), so a CPU decode step reads the weights once for the
whole batch instead of once per client::

    handler ──submit──▶ waiting (≤ max_queue, else 429) ──worker──▶ batch of ≤ max_batch_size
       ▲                                                              │ one generate_rows
       └──────── channel: TextDelta … Finished | Failed ◀─────────────┘ rows stop on their own

A batch is formed from what is waiting when the worker is free: the oldest request and every
later one with the same ``batch_key`` (one setting per generation), after waiting at most
``batch_wait`` seconds for companions. Rows stop individually (EOS, their ``max_tokens``, a
stop string, a cancelled client); the generator is closed when no row is still wanted.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from PIL import Image

from paddlemix.models.internlm_xcomposer2.beam_search import SearchStopped
from paddlemix.models.internlm_xcomposer2.generation import generate_rows, seeded, seen_ids
from paddlemix.models.internlm_xcomposer2.processor import InternLMXComposer2Processor
from paddlemix.models.internlm_xcomposer2.textstream import IncrementalText

from .channels import Channel, Event, Failed, Finished, TextDelta, deliver
from .errors import APIError, bad_request
from .limits import DEFAULT_BATCH_WAIT, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE
from .packing import PACKING, pack_model
from .protocol import Conversation, SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["Engine", "EngineStats", "Job"]


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="unavailable")


@dataclass
class Job:
    """One request on its way through the engine."""

    id: str
    conversation: Conversation
    images: List[Image.Image]
    sampling: SamplingParams
    prompt_tokens: int
    channel: Channel
    stream: bool = False
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    done: bool = False
    first_token: Optional[float] = None
    completion_tokens: int = 0
    batch_size: int = 0


@dataclass
class EngineStats:
    requests: int = 0
    batches: int = 0
    cancelled: int = 0
    failed: int = 0
    completion_tokens: int = 0
    batch_sizes: Dict[int, int] = field(default_factory=dict)  # size -> how many batches had it
    steps: int = 0  # decode steps after each batch's first ids
    prefill_seconds: float = 0.0  # time to each batch's first ids (embedding the prompts is not in it)
    model_seconds: float = 0.0  # time inside the model's decode steps after the first ids
    host_seconds: float = 0.0  # time the worker spent on the rows between steps (text, stops, channels)

    @property
    def max_batch_size(self) -> int:
        return max(self.batch_sizes, default=0)


class _Row:
    """Decoding state of one job inside a running batch."""

    def __init__(self, job: Job, tokenizer, eos: set) -> None:
        self.job, self.eos = job, eos
        self.text = IncrementalText(tokenizer, job.sampling.stop)
        self.active = True

    def feed(self, token: int, now: float, outbox: List[Tuple[Channel, Event]]) -> Optional[str]:
        """Take the row's next id (new text goes to ``outbox``); returns the finish reason once the
        row has ended."""
        job = self.job
        if job.first_token is None:
            job.first_token = now
        job.completion_tokens += 1
        delta = self.text.push(token)
        if delta and job.stream:
            outbox.append((job.channel, TextDelta(delta)))
        if token in self.eos or self.text.stopped:
            return "stop"
        return "length" if job.completion_tokens >= job.sampling.max_tokens else None


class Engine:
    """Owns the model; :meth:`submit` jobs from any thread, results arrive on each job's channel.
    ``weight_packing`` (``auto``/``on``/``off``, see ``packing.py``): whether :meth:`start` packs the
    decode weights for batched CPU decoding (and :meth:`stop` drops the copy)."""

    def __init__(self, model: Any, tokenizer: Any, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_queue: int = DEFAULT_MAX_QUEUE,
                 batch_wait: float = DEFAULT_BATCH_WAIT, weight_packing: str = "auto") -> None:
        if max_batch_size < 1 or max_queue < 1 or batch_wait < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and batch_wait >= 0")
        if weight_packing not in PACKING:
            raise ValueError(f"weight_packing must be one of {', '.join(PACKING)}, got {weight_packing!r}")
        self.weight_packing, self.packed_bytes = weight_packing, 0
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue, self.batch_wait = max_batch_size, max_queue, batch_wait
        self.processor = InternLMXComposer2Processor.from_config(tokenizer, model.config)
        self.stats = EngineStats()
        self._waiting: Deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: List[Job] = []
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.on_batch: Optional[Callable[[List[Job]], None]] = None  # observer (tests, benchmarks)

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "Engine":
        self.packed_bytes = pack_model(self.model, self.max_batch_size, self.weight_packing)
        self._thread = threading.Thread(target=self._work, name="ixc2-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker: running rows stop at their next step; they and waiting requests fail with 503."""
        with self._cond:
            self._stopping = True
            for job in self._running:
                job.cancelled = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._cond.notify_all()
        self._fail(waiting, _shutting_down())
        if self._thread is not None:
            self._thread.join(timeout)
        if self.packed_bytes:  # a step still running keeps its own reference to the copies
            self.model.unpack_for_batched_decoding()
            self.packed_bytes = 0

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def waiting(self) -> int:
        """Requests queued and not yet in a batch."""
        with self._cond:
            return len(self._waiting)

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._waiting and not self._running

    # --- requests ----------------------------------------------------------------------------
    def count_prompt(self, conversation: Conversation, num_images: int, max_tokens: int) -> int:
        """Prompt length in tokens (each image counts its embeddings); 400 if it does not fit."""
        try:
            layout = self.processor.chat_layout(conversation.query, conversation.history, num_images,
                                                conversation.meta_instruction)
        except ValueError as err:
            raise bad_request(str(err), "messages") from err
        config = self.model.config
        if len(layout) > config.max_length:
            raise bad_request(f"the prompt is {len(layout)} tokens (images included), more than this model's context "
                              f"of {config.max_length}; shorten the conversation", "messages",
                              code="context_length_exceeded")
        if len(layout) + max_tokens > config.max_position_embeddings:
            raise bad_request(f"the prompt ({len(layout)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                              f"{config.max_position_embeddings} positions; lower max_tokens", "max_tokens",
                              code="context_length_exceeded")
        return len(layout)

    def new_id(self) -> str:
        return f"chatcmpl-{uuid.uuid4().hex}"

    def submit(self, job: Job) -> None:
        """Queue ``job``; a full queue refuses it at once (429)."""
        with self._cond:
            if self._stopping:
                raise _shutting_down()
            if len(self._waiting) >= self.max_queue:
                raise APIError.queue_full(self.max_queue)
            self._waiting.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: drop ``job`` if it waits, stop its row if it runs."""
        with self._cond:
            if job.done or job.cancelled:
                return
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                job.done = True
            self.stats.cancelled += 1
        logger.info("request %s cancelled by the client after %d tokens", job.id, job.completion_tokens)

    # --- the worker --------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            jobs = self._next_batch()
            if not jobs:
                return
            try:
                self._run_batch(jobs)
            except Exception as err:  # a bug or a device failure: fail this batch, keep serving
                logger.exception("batch of %d failed", len(jobs))
                self._fail(jobs, APIError.internal(f"generation failed: {type(err).__name__}: {err}"))
            finally:
                with self._cond:
                    self._running = []

    def _next_batch(self) -> List[Job]:
        """The oldest waiting request and those that may share its batch; ``[]`` only when stopping."""
        with self._cond:
            while True:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return []
                batch = self._gather(self._waiting[0])
                if batch:
                    break
            for job in batch:
                self._waiting.remove(job)
            self._running = batch
            return batch

    def _gather(self, first: Job) -> List[Job]:
        """Wait up to ``batch_wait`` after ``first`` arrived for rows to join it (lock held); ``[]``
        if ``first`` was cancelled meanwhile or the engine is stopping, so the caller picks again."""
        key = first.sampling.batch_key(first.id)
        while first in self._waiting and not self._stopping:
            batch = [job for job in self._waiting if job.sampling.batch_key(job.id) == key][: self.max_batch_size]
            wait = first.enqueued + self.batch_wait - time.perf_counter()
            if len(batch) >= self.max_batch_size or first.sampling.seed is not None or wait <= 0:
                return batch
            self._cond.wait(wait)
        return []

    def _prefill_inputs(self, jobs: List[Job]):
        """Per-row ``(layout, embeds, im_mask)``; a row the model refuses fails alone."""
        rows, kept = [], []
        for job in jobs:
            conv = job.conversation
            try:
                rows.append(self.model._chat_inputs(self.tokenizer, conv.query, job.images, conv.history,
                                                    conv.meta_instruction))
                kept.append(job)
            except ValueError as err:
                self._fail([job], bad_request(str(err), "messages"))
        return rows, kept

    def _run_batch(self, jobs: List[Job]) -> None:
        model, tok = self.model, self.tokenizer
        if self._stopping:  # stop() came between leaving the queue and here
            self._fail(jobs, _shutting_down())
            return
        for job in jobs:
            job.done = job.done or job.cancelled  # cancelled between leaving the queue and here
        rows, jobs = self._prefill_inputs([job for job in jobs if not job.cancelled])
        if not jobs:
            return
        self._count_batch(jobs)
        if jobs[0].sampling.num_beams > 1:  # alone in its batch (batch_key)
            self._run_beams(jobs[0], rows[0])
            return
        seen = seen_ids([model._official_prefix(tok, layout) for layout, _, _ in rows])
        settings = model._settings(tok, **jobs[0].sampling.generation_kwargs(max(j.sampling.max_tokens for j in jobs)))
        states = [_Row(job, tok, set(settings.eos_token_ids)) for job in jobs]
        # A seeded generation restores the global RNG state when it ends: its answer is held until
        # then, so that whoever receives it cannot start drawing numbers before the restore.
        held: Optional[List[Tuple[Job, Finished]]] = [] if settings.seed is not None else None
        try:
            with seeded(settings.seed):
                # each prompt prefilled alone (exactly chat()'s forward), its first token streamed at
                # once, then the rows decoded together
                early: Set[int] = set()

                def first_token(row: int, token: int) -> None:
                    early.add(row)
                    self._step([states[row]], [token], time.perf_counter(), held)

                steps = generate_rows(model, [(embeds, im_mask) for _, embeds, im_mask in rows], settings, seen,
                                      on_first=first_token)
                try:
                    self._decode(steps, states, held, early)
                finally:
                    steps.close()  # stops the work of rows nobody waits for
        finally:  # rows that finished get their answer even if a later step failed (the others fail)
            deliver([(job.channel, event) for job, event in held or []])
        outbox: List[Tuple[Channel, Event]] = []
        for row in states:
            if row.active:  # the generator ended (every row reached EOS or max_new_tokens)
                self._finish(row, "length", outbox)
        deliver(outbox)

    def _run_beams(self, job: Job, inputs: Tuple[Any, Any, Any]) -> None:
        """A beam search (the official ``chat(num_beams=k)``) on the prompt ``_prefill_inputs`` built:
        the answer is known only at the end, so a stream gets it in one piece; a client that goes
        away (or a stopping server) ends the search after the current step."""
        tok = self.tokenizer
        settings = job.sampling.generation_kwargs(job.sampling.max_tokens)
        started = time.perf_counter()
        try:
            ids = self.model._beam_answer(tok, inputs, settings, job.sampling.num_beams, 1.0,
                                          should_stop=lambda: job.cancelled or self._stopping)
        except SearchStopped:
            if self._stopping:  # cancelled by stop(): the client still waits for an answer
                self._fail([job], _shutting_down())
            job.done = True  # else the client went away
            return
        with self._cond:
            self.stats.prefill_seconds += time.perf_counter() - started
        row, outbox = _Row(job, tok, set(self.model._settings(tok).eos_token_ids)), []
        reason = None
        for token in ids:
            reason = row.feed(token, time.perf_counter(), outbox)
            if reason is not None:
                break
        self._finish(row, reason or "length", outbox)
        deliver(outbox)

    def _decode(self, steps, states: List[_Row], held: Optional[List[Tuple[Job, Finished]]],
                early: Set[int]) -> None:
        """Feed every step's ids to the rows until none is still wanted; times model vs host work.
        ``early``: the rows whose first id was already fed (as its prefill ended); the first step
        skips them."""
        times = {"prefill": 0.0, "model": 0.0, "host": 0.0}
        count = 0
        mark = time.perf_counter()
        try:
            for tokens, _ in steps:
                now = time.perf_counter()
                times["model" if count else "prefill"] += now - mark
                count += 1
                ids = tokens.tolist()
                if count == 1 and early:
                    fresh = [i for i in range(len(states)) if i not in early]
                    self._step([states[i] for i in fresh], [ids[i] for i in fresh], now, held)
                else:
                    self._step(states, ids, now, held)
                mark = time.perf_counter()
                times["host"] += mark - now
                if not any(row.active for row in states):
                    break
        finally:
            with self._cond:
                self.stats.steps += max(count - 1, 0)
                self.stats.prefill_seconds += times["prefill"]
                self.stats.model_seconds += times["model"]
                self.stats.host_seconds += times["host"]

    def _step(self, states: List[_Row], tokens: List[int], now: float,
              held: Optional[List[Tuple[Job, Finished]]]) -> None:
        outbox: List[Tuple[Channel, Event]] = []
        try:
            for row, token in zip(states, tokens):
                if not row.active:
                    continue
                if row.job.cancelled:
                    row.active = False
                    if self._stopping:  # cancelled by stop(): the client still waits for an answer
                        self._fail([row.job], _shutting_down())
                    else:  # the client went away
                        row.job.done = True
                    continue
                reason = row.feed(token, now, outbox)
                if reason is not None:
                    self._finish(row, reason, outbox, held)
        finally:  # what finished before a failure in this step is delivered; _fail skips it
            deliver(outbox)

    def _count_batch(self, jobs: List[Job]) -> None:
        with self._cond:
            self.stats.batches += 1
            self.stats.batch_sizes[len(jobs)] = self.stats.batch_sizes.get(len(jobs), 0) + 1
        for job in jobs:
            job.batch_size = len(jobs)
        if self.on_batch is not None:
            self.on_batch(jobs)

    def _finish(self, row: _Row, reason: str, outbox: List[Tuple[Channel, Event]],
                held: Optional[List[Tuple[Job, Finished]]] = None) -> None:
        """End the row: the rest of its text, the log line, and ``Finished`` (to ``outbox``, or
        ``held`` until the generation's RNG state is restored)."""
        job = row.job
        row.active = False
        delta, content = row.text.finish()
        if delta and job.stream:
            outbox.append((job.channel, TextDelta(delta)))
        job.done = True
        with self._cond:
            self.stats.requests += 1
            self.stats.completion_tokens += job.completion_tokens
        elapsed = time.perf_counter() - job.enqueued
        ttft = (job.first_token or time.perf_counter()) - job.enqueued
        logger.info("request %s: %d prompt + %d completion tokens in %.2f s (first token %.2f s), finish %s, "
                    "batch of %d", job.id, job.prompt_tokens, job.completion_tokens, elapsed, ttft, reason,
                    job.batch_size)
        event = Finished(content, reason, job.prompt_tokens, job.completion_tokens)
        if held is not None:
            held.append((job, event))
        else:
            outbox.append((job.channel, event))

    def _fail(self, jobs: List[Job], error: APIError) -> None:
        for job in jobs:
            if job.done:
                continue
            job.done = True
            with self._cond:
                self.stats.failed += 1
            logger.info("request %s failed (%d): %s", job.id, error.status, error.message)
            job.channel.put(Failed(error))
