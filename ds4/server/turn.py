"""One request's trip through the worker, as protocol-neutral async events.

A :class:`Turn` submits the job, then yields: ``KEEPALIVE`` when nothing was
yielded for ``keepalive`` seconds (queue wait, long prefill), a
:class:`PromptDone` once the prompt is in the KV state, the
:mod:`ds4.dsml` stream events (reasoning/text deltas, tool-call start /
argument deltas / end), and finally a :class:`Final` (or a
:class:`Failure`). If the consumer stops early (client gone) the job is
withdrawn: dropped from the queue, or stopped at its next token.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ..dsml import ParsedMessage, StreamParser, TextDelta, finish_reason
from .requests import ApiError
from .worker import Job, QueueFull, ShuttingDown

KEEPALIVE = object()


@dataclass
class Usage:
    prompt: int = 0
    cached: int = 0
    completion: int = 0

    @property
    def written(self):
        return self.prompt - self.cached

    def openai(self):
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion,
                "prompt_tokens_details": {"cached_tokens": self.cached,
                                          "cache_write_tokens": self.written}}

    def responses(self):
        return {"input_tokens": self.prompt,
                "input_tokens_details": {"cached_tokens": self.cached,
                                         "cache_write_tokens": self.written},
                "output_tokens": self.completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt + self.completion}

    def anthropic(self, final=True):
        return {"input_tokens": 0, "output_tokens": self.completion if final else 0,
                "cache_read_input_tokens": self.cached,
                "cache_creation_input_tokens": self.written}


@dataclass
class PromptDone:
    usage: Usage
    source: str


@dataclass
class Final:
    finish: str                    # stop | length | tool_calls | error
    message: ParsedMessage | None  # None for raw turns (completions)
    text: str                      # everything generated (stop sequences applied)
    usage: Usage
    note: str | None = None
    stop_sequence: str | None = None   # the client stop sequence that ended the output


@dataclass
class Failure:
    message: str


class Turn:
    def __init__(self, server, prep, *, new_id=None, raw=False, tail="all"):
        self.server = server
        self.prep = prep
        self.new_id = new_id
        self.raw = raw
        self.tail = tail
        self.usage = Usage()

    async def events(self):
        server, prep = self.server, self.prep
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()

        def emit(ev):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:        # the loop is gone (server stopped)
                pass

        job = Job(text=prep.text, ids=prep.ids, thinking=prep.thinking, tools=prep.tools,
                  max_tokens=prep.max_tokens, params=prep.params, stop=prep.stop,
                  chat=not self.raw, keeps_reasoning=prep.keeps_reasoning, emit=emit,
                  endpoint=prep.extra.get("endpoint", ""), request=prep.extra.get("request", ""))
        try:
            server.worker.submit(job)
        except QueueFull:
            raise ApiError(429, "too many requests queued; retry later",
                           kind="rate_limit_error") from None
        except ShuttingDown:
            raise ApiError(503, "server shutting down") from None
        parser = None if self.raw else StreamParser(thinking=prep.thinking, tools=prep.tools,
                                                    new_id=self.new_id)
        pieces = []
        finished = False
        interval = server.keepalive
        last = time.monotonic()
        # asyncio.wait, not wait_for: before Python 3.12, wait_for returns an
        # item that arrives as the handler is cancelled (client gone) and
        # drops the cancellation, so the job ran to its end
        getter = None
        try:
            while True:
                wait = max(0.0, interval - (time.monotonic() - last))
                if getter is None:
                    getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait((getter,), timeout=wait)
                if not done:
                    last = time.monotonic()
                    yield KEEPALIVE
                    continue
                ev, getter = getter.result(), None
                kind = ev[0]
                out = []
                if kind == "prompt":
                    self.usage.prompt, self.usage.cached = ev[1], ev[2]
                    out.append(PromptDone(self.usage, ev[3]))
                elif kind == "piece":
                    pieces.append(ev[1])
                    out.extend(parser.feed(ev[1]) if parser else [TextDelta(ev[1])])
                elif kind == "done":
                    finished = True
                    self.usage.completion = ev[2]
                    yield_final = self._final(parser, ev[1], ev[3], "".join(pieces), ev[4])
                    for e in out + yield_final:
                        yield e
                    return
                elif kind == "error":
                    finished = True
                    yield Failure(ev[1])
                    return
                for e in out:
                    yield e
                if out:
                    last = time.monotonic()
        finally:
            if getter is not None:
                getter.cancel()
            if not finished:
                server.worker.withdraw(job)

    def _final(self, parser, finish, saw_tool_start, text, stop_sequence):
        if parser is None:
            return [Final(finish, None, text, self.usage, stop_sequence=stop_sequence)]
        events = parser.finish(tail=self.tail)
        message = parser.result.message
        finish, note = finish_reason(finish, message, tools=self.prep.tools,
                                     saw_tool_start=saw_tool_start)
        if message.tool_calls and message.raw_dsml:
            self.server.remember_calls(message)
        return events + [Final(finish, message, text, self.usage, note, stop_sequence)]
