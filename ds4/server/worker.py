"""The single inference worker: a FIFO of jobs, one thread, one live KV state.

Handlers (on the event loop) submit a :class:`Job`; the worker thread runs
it on the engine and hands events back through ``job.emit`` (which the
handler wires to ``loop.call_soon_threadsafe``), so the loop never waits on
native code. Cancellation is a ``threading.Event`` checked between prefill
chunks and between tokens.

Prefix reuse (prompt-and-server.md §5.1): the live tokens are reused when
they are a token prefix of the new prompt (``memory-token``), when their
decoded bytes are a byte prefix of the rendered prompt (``memory-text``: a
stateless client replaying the sampled text, whose tokenization may differ
from the sampled ids), or when the prompt extends the remembered visible
transcript of a thinking turn whose hidden reasoning the client dropped
(``thinking-visible``; ds4's ``responses-visible`` too: the same rule covers
tool-call turns replayed without their reasoning). Otherwise the engine rewinds to the longest common
token prefix, or a disk checkpoint is loaded when it covers more.
"""
from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field

from ..chat import THINK_CLOSE, THINK_OPEN
from ..dsml import GenerationMonitor, StopMatcher, parse_generated
from ..errors import Error
from ..generation import common_prefix
from .engine import Cancelled, SamplingParams

log = logging.getLogger("ds4.server")


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class Job:
    text: str                      # rendered prompt
    ids: list                      # its canonical token ids
    thinking: bool                 # the prompt ends with <think>
    tools: bool                    # DSML tool calls are active
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: list = field(default_factory=list)
    chat: bool = True              # a chat API (not raw completions): remember visible text
    keeps_reasoning: bool = False  # the prompt keeps earlier turns' reasoning (tool context)
    emit: object = None            # callable(event tuple), thread-safe
    endpoint: str = ""             # for --trace: the path and the raw request JSON
    request: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)


# Events (tuples, first item the kind):
#   ("started",)                              the worker took the job
#   ("prefill", done, total)                  prefill progress
#   ("prompt", prompt_tokens, cached, source) the prompt is in the KV state
#   ("piece", text)                           generated text (stop sequences applied)
#   ("done", finish, completion_tokens, saw_tool_start, matched stop sequence or None)
#                                             finish: stop | length | tool_calls | error
#   ("error", message)                        the engine failed


class Worker:
    def __init__(self, engine, *, max_queue=16, kv_cache=None, trace=None):
        self.engine = engine
        self.max_queue = max_queue
        self.kv_cache = kv_cache
        self.trace = trace          # a ds4.server.trace.Trace, or None
        self._jobs = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = None
        self.busy = False
        self._current = None
        self._visible = None        # (text, live length) of a thinking answer (§5.1 rung 5)
        self.last_source = None

    # -- loop side -------------------------------------------------------

    def start(self):
        self._thread = threading.Thread(target=self._run, name="ds4-worker", daemon=True)
        self._thread.start()

    def submit(self, job):
        with self._cv:
            if self._stopping:
                raise ShuttingDown()
            if len(self._jobs) >= self.max_queue + (0 if self.busy else 1):
                raise QueueFull()
            self._jobs.append(job)
            self._cv.notify()

    def withdraw(self, job):
        """Cancel a job: dropped if still queued, stopped at the next token if running."""
        job.cancel.set()
        with self._cv:
            try:
                self._jobs.remove(job)
            except ValueError:
                pass

    @property
    def queued(self):
        return len(self._jobs)

    def begin_stop(self):
        """Refuse new jobs; queued ones and the running decode end with an error."""
        with self._cv:
            self._stopping = True
            for job in self._jobs:
                job.cancel.set()
                job.emit(("error", "server shutting down"))
            self._jobs.clear()
            if self._current is not None:
                self._current.cancel.set()
                self._current.emit(("error", "shutdown requested"))
            self._cv.notify()

    def stop(self, timeout=None):
        """begin_stop, wait for the worker thread, then the kv_cache's shutdown save."""
        self.begin_stop()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.kv_cache is not None:
            try:
                self.kv_cache.shutdown(self.engine.session)
            except Exception:
                log.exception("kv cache shutdown save failed")

    # -- worker thread ---------------------------------------------------

    def _run(self):
        while True:
            with self._cv:
                while not self._jobs and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                job = self._jobs.popleft()
                self._current = job
                self.busy = True
            try:
                if not job.cancel.is_set():
                    self._execute(job)
            except Exception as exc:   # keep serving whatever one request did
                log.exception("request failed")
                self._safe_reset()
                job.emit(("error", _one_line(exc)))
            finally:
                with self._cv:
                    self.busy = False
                    self._current = None

    def _safe_reset(self):
        self._visible = None
        try:
            self.engine.reset()
        except Exception:
            log.exception("engine reset failed")

    def _match(self, job, live):
        """(effective prompt ids, source label) per the §5.1 ladder."""
        ids = job.ids
        if live and len(live) <= len(ids) and ids[:len(live)] == live:
            return ids, "memory-token"
        if live:
            prompt = job.text.encode("utf-8")
            vis = self._visible
            if vis is not None and vis[1] == len(live):
                v = vis[0].encode("utf-8")
                if len(prompt) > len(v) and prompt.startswith(v):
                    rest = prompt[len(v):].decode("utf-8")
                    return live + self.engine.tokenizer.encode(rest, special=True), \
                        "thinking-visible"
            live_bytes = self.engine.tokenizer.decode_bytes(live)
            if len(prompt) > len(live_bytes) and prompt.startswith(live_bytes):
                try:
                    rest = prompt[len(live_bytes):].decode("utf-8")
                except UnicodeDecodeError:   # live ends inside a character
                    rest = None
                if rest is not None:
                    return live + self.engine.tokenizer.encode(rest, special=True), "memory-text"
        return ids, "prefix" if common_prefix(live, ids) else "cold"

    def _execute(self, job):
        eng = self.engine
        job.emit(("started",))
        live = eng.tokens
        ids, source = self._match(job, live)
        if len(ids) >= eng.ctx:
            raise Error(f"prompt exceeds context ({len(ids)} of {eng.ctx} tokens)")
        shared = common_prefix(live, ids)
        kv = self.kv_cache
        if kv is not None:
            entry = kv.lookup(ids)
            if shared < len(live):
                kv.before_replace(eng.session)
            if entry is not None and entry.n_tokens > shared:
                if kv.load(entry, eng.session) > 0:
                    source = "disk"
        self._visible = None

        def progress(done, total):
            if job.cancel.is_set():
                raise Cancelled()
            job.emit(("prefill", done, total))

        try:
            prefilled = eng.prefill(ids, progress, kv_cache=kv)
        except Cancelled:
            return
        self.last_source = source
        log.info("prompt %d tokens: %s, %d reused, %d evaluated", len(ids), source,
                 len(ids) - prefilled, prefilled)
        job.emit(("prompt", len(ids), len(ids) - prefilled, source))
        cache = None
        if self.trace is not None:
            from .trace import mismatch_window
            cache = (f"cache: {source}, {len(ids)} prompt tokens, {len(ids) - prefilled} reused, "
                     f"{prefilled} evaluated\n{mismatch_window(eng.tokenizer, live, ids)}")
        try:
            self._generate(job, ids, cache)
        finally:
            eng.finish()

    def _generate(self, job, prompt_ids, cache=None):
        eng = self.engine
        tok_eos = eng.tokenizer.eos_id
        max_tokens = max(0, min(job.max_tokens, eng.ctx - len(prompt_ids)))
        eng.limit(max_tokens)
        monitor = GenerationMonitor(thinking=job.thinking, tools=job.tools, prompt=job.text)
        stops = StopMatcher(job.stop)
        decoder = eng.tokenizer.stream_decoder()
        sampler = eng.sampler(job.params)
        raw = []
        finish, n, pending, stop_hit = "length", 0, None, False

        def push(text):
            nonlocal stop_hit
            raw.append(text)
            monitor.feed(text)
            out, stop_hit = stops.feed(text)
            if out:
                job.emit(("piece", out))

        for _ in range(max_tokens):
            if job.cancel.is_set():
                return
            if pending is not None:
                eng.accept(pending)
                pending = None
            tok = eng.next_token(sampler, greedy=monitor.greedy)
            if tok == tok_eos or tok < 0:
                finish = "stop"
                break
            n += 1
            pending = tok
            text = decoder.feed(tok)
            if text:
                push(text)
            if stop_hit:
                finish = "stop"
                break
            if monitor.should_stop:
                finish = "tool_calls"
                break
        tail = decoder.flush()
        if tail and not stop_hit:
            push(tail)
        if not stop_hit:
            rest = stops.flush()
            if rest:
                job.emit(("piece", rest))
        if monitor.unterminated and finish in ("stop", "length"):
            finish = "error"
        matched = None
        if stop_hit:
            at = stops.find("".join(raw))
            matched = "".join(raw)[at[0]:at[0] + at[1]] if at else None
        job.emit(("done", finish, n, monitor.saw_start, matched))
        if self.trace is not None:
            text = "".join(raw)
            parsed = parse_generated(text, thinking=job.thinking) if job.chat else None
            self.trace.write(job, cache=cache, generated=text, finish=finish,
                             completion_tokens=n, parsed=parsed)
        # After the reply: the last sampled token joins the KV state, so the
        # next turn's prompt (which contains it) is a pure extension.
        if pending is not None and not job.cancel.is_set():
            eng.accept(pending)
        if job.chat and job.thinking and finish in ("stop", "tool_calls") and not stop_hit:
            self._remember_visible(job, "".join(raw))

    def _remember_visible(self, job, text):
        """What a client that drops the hidden reasoning sends back for this
        turn (§2.2): with tool context ``<think></think>`` + content + calls,
        else ``</think>`` + content; the live KV (reasoning included) stands for it."""
        if THINK_CLOSE not in text or not job.text.endswith(THINK_OPEN):
            return
        m = parse_generated(text, thinking=True)
        if job.keeps_reasoning:
            visible = job.text + THINK_CLOSE + m.content + (m.raw_dsml or "")
        else:
            visible = job.text[:-len(THINK_OPEN)] + THINK_CLOSE + m.content
        self._visible = (visible, len(self.engine.tokens))


def _one_line(exc):
    msg = str(exc).strip().splitlines()
    return msg[0] if msg else type(exc).__name__
