"""The batching engine: one thread decodes every running request together, one token per step.

The key/value cache is allocated once, `max_batch_size` rows of `max_seq_len` positions; each
sequence being generated holds one row. A request waits in line until there are rows for all its
sequences, then joins at the next step: its prompt is prefilled into its rows (together with
whatever else arrived, up to `prefill_tokens` prompt tokens, or one longer prompt) and from then on
it decodes in the same batch as the others. A sequence that ends (end-of-text, a stop string,
`max_tokens`) or whose request is cancelled gives its row back before the next step; the batch is
kept dense by moving the last row into the hole. An idle engine that gets a request waits for
others sent at the same moment (until none has come for `gather_s`, 5 ms, at most `max_gather_s`,
20 ms, or until they fill the batch), so that they share one prefill.

The engine reports to each request through its `on_event` callback, called from the engine thread
with a list of `Piece`s (or a `Failed`) after every step that produced something for it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from palm.inference.chat import StopAtText
from palm.inference.decoding import decoding_view
from palm.inference.sampling import sample
from palm.serve.batched import CacheRows, copy_row, decode_rows, prefill_rows
from palm.tokenizer import TextStreamer

log = logging.getLogger("palm.serve")


@dataclass(frozen=True)
class Sampling:
    """How a request picks its tokens (`palm.inference.sampling.sample`'s options)."""

    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    filter_thres: float | None = None


@dataclass(frozen=True)
class Piece:
    """New text of one choice; `finish_reason` ("stop" or "length") once it has ended, with the
    number of tokens it generated."""

    index: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass(frozen=True)
class Failed:
    """The request failed inside the engine; `message` says why."""

    message: str


@dataclass(eq=False)
class Job:
    """One request: `n` choices for each prompt (choice i * n + j is prompt i's j-th), each up to
    `max_tokens` tokens, ending early at end-of-text or at any of `stops` (matched on the text)."""

    prompts: list[list[int]]
    max_tokens: int
    on_event: Callable[[list[Piece] | Failed], None]
    n: int = 1
    sampling: Sampling = Sampling()
    stops: list[str] = field(default_factory=list)
    seed: int | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    sequences: list[Sequence] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.prompts) * self.n


@dataclass(eq=False)
class Sequence:
    """One choice being generated: the tokens in its cache row and its text so far."""

    job: Job
    index: int
    prompt: list[int]
    streamer: TextStreamer
    stop: StopAtText
    cached: int = 0  # positions of its row written so far
    last_token: int = 0  # sampled, not yet in the cache
    generated: int = 0
    done: bool = False


class Engine:
    """Decodes the requests given to `submit` as one batch, on a thread of its own (`start`/`stop`)."""

    def __init__(self, model: nn.Module, tokenizer, *, max_batch_size: int = 8, max_seq_len: int | None = None,
                 prefill_tokens: int = 512, gather_s: float = 0.005, max_gather_s: float = 0.02,
                 compile: bool = False):
        self.tokenizer = tokenizer
        self.decoder = decoding_view(model)
        self.device = model.token_emb.weight.device
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or model.config.max_seq_len
        self.prefill_tokens = prefill_tokens
        self.gather_s, self.max_gather_s = gather_s, max_gather_s
        self.cache = self.decoder.make_cache(max_batch_size, self.max_seq_len)
        self.decode = decode_rows
        if compile:
            options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
            self.decode = torch.compile(decode_rows, dynamic=True, options=options)
        self.rows: list[Sequence] = []  # rows[i] holds cache row i
        self.waiting: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.prefilling = 0  # sequences taken from the queue, not yet in the batch
        self.steps = 0
        self.prefills = 0
        self.generated_tokens = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # decode steps by rows in the batch

    # ---- the server's side (any thread) ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="palm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the current step, fail whatever is still running or waiting, end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, job: Job) -> None:
        """Queue `job`; its sequences join the batch when rows are free for all of them."""
        if job.size > self.max_batch_size:
            raise ValueError(f"a request of {job.size} sequences cannot fit {self.max_batch_size} rows")
        with self._wake:
            self.waiting.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Stop generating for `job`: its rows are freed before the next step."""
        job.cancelled = True
        with self._wake:
            self._wake.notify()

    def stats(self) -> dict:
        return {
            "max_batch_size": self.max_batch_size,
            "max_seq_len": self.max_seq_len,
            "active_sequences": len(self.rows),
            "free_slots": self.max_batch_size - len(self.rows),
            "prefilling_sequences": self.prefilling,
            "waiting_requests": len(self.waiting),
            "decode_steps": self.steps,
            "prefills": self.prefills,
            "generated_tokens": self.generated_tokens,
            "decode_steps_by_batch_size": {str(k): v for k, v in sorted(self.batch_sizes.items())},
        }

    # ---- the engine thread ----

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    if not self.rows and not self.waiting:
                        while not self._stopping and not self.waiting:
                            self._wake.wait()
                        self._gather()
                    if self._stopping:
                        break
                    self._drop_cancelled()
                    admitted = self._admissible()
                if admitted:
                    self.prefilling = sum(job.size for job in admitted)
                    self._prefill(admitted)
                    self.prefilling = 0
                if self.rows:
                    self._decode_step()
            with self._wake:
                jobs = {s.job for s in self.rows} | set(self.waiting)
                self.waiting.clear()
            for job in jobs:
                self._fail(job, "the server is shutting down")
            self._free_finished()

    def _gather(self) -> None:
        """Requests sent together reach the server one by one, milliseconds apart (more on a busy
        machine): wait until none has arrived for `gather_s`, at most `max_gather_s` in all, or
        until the waiting ones fill the batch, so that they share one prefill. Called holding `_wake`."""
        started = last_arrival = time.monotonic()
        arrived = len(self.waiting)
        while not self._stopping and sum(job.size for job in self.waiting) < self.max_batch_size:
            if len(self.waiting) != arrived:
                last_arrival, arrived = time.monotonic(), len(self.waiting)
            remaining = min(last_arrival + self.gather_s, started + self.max_gather_s) - time.monotonic()
            if remaining <= 0:
                break
            self._wake.wait(remaining)

    def _drop_cancelled(self) -> None:
        self.waiting = collections.deque(job for job in self.waiting if not job.cancelled)
        for seq in self.rows:
            if seq.job.cancelled:
                seq.done = True
        self._free_finished()

    def _admissible(self) -> list[Job]:
        """Waiting jobs, in arrival order, that fit the free rows and the prefill budget (at least one)."""
        taken, free, budget = [], self.max_batch_size - len(self.rows), self.prefill_tokens
        while self.waiting:
            job = self.waiting[0]
            tokens = sum(len(p) for p in job.prompts) * job.n
            if job.size > free or (taken and tokens > budget):
                break
            taken.append(self.waiting.popleft())
            free -= job.size
            budget -= tokens
        return taken

    def _prefill(self, jobs: list[Job]) -> None:
        start = len(self.rows)
        for job in jobs:
            if job.seed is not None:
                job.generator = torch.Generator(device=self.device).manual_seed(job.seed)
            job.sequences = [
                Sequence(job, i * job.n + j, prompt, TextStreamer(self.tokenizer), StopAtText(job.stops), cached=len(prompt))
                for i, prompt in enumerate(job.prompts) for j in range(job.n)
            ]
        sequences = [seq for job in jobs for seq in job.sequences]
        try:
            logits = prefill_rows(self.decoder, CacheRows.of(self.cache, start, start + len(sequences)),
                                  [seq.prompt for seq in sequences])
        except Exception as e:  # one failed prefill fails its own requests only
            log.exception("prefill failed")
            for job in jobs:
                self._fail(job, f"prefill failed: {e}")
            return
        self.prefills += 1
        self.rows.extend(sequences)
        offset = start
        for job in jobs:
            self._advance(job, {seq: logits[row - start] for row, seq in enumerate(job.sequences, offset)})
            offset += len(job.sequences)
        self._free_finished()

    def _decode_step(self) -> None:
        rows = self.rows
        tokens = torch.tensor([seq.last_token for seq in rows], device=self.device)
        positions = [seq.cached for seq in rows]
        try:
            logits = self.decode(self.decoder, CacheRows.of(self.cache, 0, len(rows)), tokens,
                                 torch.tensor(positions, device=self.device), max(positions) + 1)
        except Exception as e:  # cannot tell whose: fail the batch, keep serving
            log.exception("decode step failed")
            for job in {seq.job for seq in rows}:
                self._fail(job, f"decoding failed: {e}")
            self._free_finished()
            return
        self.steps += 1
        self.batch_sizes[len(rows)] += 1
        by_job: dict[Job, dict[Sequence, torch.Tensor]] = {}
        for row, seq in enumerate(rows):
            seq.cached += 1
            by_job.setdefault(seq.job, {})[seq] = logits[row]
        for job, seq_logits in by_job.items():
            self._advance(job, seq_logits)
        self._free_finished()

    def _advance(self, job: Job, seq_logits: dict[Sequence, torch.Tensor]) -> None:
        """Sample the next token of each of `job`'s live sequences (in choice order, so that a seed
        gives the same tokens whatever else is in the batch) and report the new text."""
        live = sorted(seq_logits, key=lambda seq: seq.index)
        try:
            s = job.sampling
            tokens = sample(torch.stack([seq_logits[seq] for seq in live]), temperature=s.temperature,
                            filter_thres=s.filter_thres, top_k=s.top_k, top_p=s.top_p, generator=job.generator)
            pieces = [piece for seq, token in zip(live, tokens.tolist()) if (piece := self._take(seq, token))]
        except Exception as e:  # fails this request only
            log.exception("request failed")
            self._fail(job, f"{type(e).__name__}: {e}")
            return
        if pieces:
            self._send(job, pieces)

    def _take(self, seq: Sequence, token: int) -> Piece | None:
        """Add `token` to `seq`; the text it releases, and whether that ends the sequence."""
        seq.generated += 1
        self.generated_tokens += 1
        if token == self.tokenizer.eos_id:
            seq.done = True
            return Piece(seq.index, seq.stop.flush(), "stop", seq.generated)
        seq.last_token = token
        text = seq.stop.push(seq.streamer.push(token))
        if seq.stop.stopped:
            seq.done = True
            return Piece(seq.index, text, "stop", seq.generated)
        if seq.generated >= seq.job.max_tokens:
            seq.done = True
            return Piece(seq.index, text + seq.stop.flush(), "length", seq.generated)
        return Piece(seq.index, text) if text else None

    def _fail(self, job: Job, message: str) -> None:
        for seq in job.sequences:
            seq.done = True
        self._send(job, Failed(message))

    def _send(self, job: Job, event: list[Piece] | Failed) -> None:
        try:
            job.on_event(event)
        except Exception:  # the listener is gone (its event loop closed): stop generating
            log.debug("dropping events of a request whose listener is gone", exc_info=True)
            job.cancelled = True
            for seq in job.sequences:
                seq.done = True

    def _free_finished(self) -> None:
        """Give back the rows of finished sequences, moving the last rows into the holes."""
        rows, r = self.rows, 0
        while True:
            while rows and rows[-1].done:
                rows.pop()
            if r >= len(rows):
                return
            if rows[r].done:
                last = rows.pop()
                copy_row(self.cache, len(rows), r, last.cached)
                rows[r] = last
            r += 1

