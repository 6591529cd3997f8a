"""The engine seam: the one interface generation goes through.

The worker drives an engine with five calls per request: ``prefill(ids)``
brings the live KV state to exactly ``ids`` (reusing the common prefix),
``sampler(params)`` makes a per-request sampler, ``limit(n)`` says how many
tokens the reply may draw, ``next_token(sampler, greedy)`` samples from the
current logits, ``accept(token)`` evaluates a sampled token into the KV
state, and ``finish()`` ends the reply (the state then holds exactly the
accepted tokens). :class:`ModelEngine` does this on a
ds4 Model and one live Session (greedy tokens on CUDA by the GPU's own steps,
generation.Stepper); :class:`ScriptedEngine` emits scripted text as
real token ids of the same tokenizer, so tests exercise the server's whole
code path without running a model.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ..errors import Error
from ..generation import PREFILL_CHUNK, Stepper, common_prefix, prefill

MODEL_ID = "deepseek-v4-flash"


class Cancelled(Exception):
    """The request was cancelled (client gone); raised between tokens/chunks."""


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.05
    seed: int | None = None


class ModelEngine:
    """A ds4 Model with one live Session (the server's only KV state)."""

    def __init__(self, model, ctx=None):
        from ..sampling import Sampler
        self.model = model
        self.tokenizer = model.tokenizer
        self.ctx = int(ctx or model.ctx)
        self.session = model.session(self.ctx)
        self._Sampler = Sampler
        self._greedy = Sampler(temperature=0)
        self._device_steps = model.backend == "cuda"
        self._steps = None   # the reply's Stepper, from its prefill's logits

    @property
    def tokens(self):
        return self.session.tokens

    def prefill(self, ids, progress=None, kv_cache=None):
        """Evaluates what differs between the live tokens and ``ids``; returns
        the number of tokens evaluated. ``progress(done, total)`` may raise
        Cancelled between chunks. A disk KV cache prefills itself, pausing at
        its checkpoint lengths to save them exactly."""
        if kv_cache is not None:
            logits, evaluated = kv_cache.prefill(self.session, ids, progress)
        else:
            logits, evaluated = prefill(self.session, ids, progress)
        self._steps = Stepper(self.session, logits, device_steps=self._device_steps)
        return evaluated

    def sampler(self, params: SamplingParams):
        return self._Sampler(temperature=params.temperature, top_k=params.top_k,
                             top_p=params.top_p, min_p=params.min_p, seed=params.seed)

    def limit(self, max_tokens):
        """At most max_tokens draws follow: no greedy step is fed ahead past them."""
        self._steps.left = max_tokens

    def next_token(self, sampler, greedy=False):
        return self._steps.draw(self._greedy if greedy else sampler)

    def accept(self, token):
        self._steps.accept(token)

    def finish(self):
        """The greedy tokens fed ahead of the accepted ones leave the state."""
        if self._steps is not None:
            self._steps.settle()

    def reset(self):
        """Drops the live state (after a failure left it unknown)."""
        self.session.rewind(0)
        self._steps = None


class _ScriptedSession:
    """What a kv_cache sees of the scripted engine: a token list."""

    def __init__(self):
        self.tokens = []

    @property
    def n_tokens(self):
        return len(self.tokens)

    def rewind(self, n):
        del self.tokens[n:]


class ScriptedEngine:
    """Replies with scripted texts, tokenized with a real tokenizer.

    ``script(text)`` queues one reply: the text is encoded with special-token
    recognition (so ``</think>`` and ``｜DSML｜`` are the model's real ids)
    and followed by EOS. A reply given as a list of strings is encoded piece
    by piece, which yields a non-canonical tokenization as a sampling model
    may produce. Requests with no queued reply get ``default``.
    ``token_delay`` and ``prefill_delay`` (seconds per token) make it slow on
    purpose; ``eval_log`` records how many tokens each prefill evaluated and
    ``sampled`` how many tokens each request drew.
    """

    def __init__(self, tokenizer, *, ctx=32768, default="ok", token_delay=0.0,
                 prefill_delay=0.0):
        self.tokenizer = tokenizer
        self.ctx = ctx
        self.default = default
        self.token_delay = token_delay
        self.prefill_delay = prefill_delay
        self.session = _ScriptedSession()
        self.eval_log = []
        self.sampled = []
        self._replies = []
        self._lock = threading.Lock()
        self._current = []

    @property
    def tokens(self):
        return list(self.session.tokens)

    def script(self, *texts):
        with self._lock:
            for text in texts:
                self._replies.append(self._encode(text))

    def _encode(self, text):
        pieces = [text] if isinstance(text, str) else text
        return [i for p in pieces for i in self.tokenizer.encode(p, special=True)] \
            + [self.tokenizer.eos_id]

    def prefill(self, ids, progress=None, kv_cache=None):
        s = self.session
        keep = min(common_prefix(s.tokens, ids), len(ids) - 1)
        todo = ids[keep:]
        s.rewind(keep)
        for start in range(0, len(todo), PREFILL_CHUNK):
            chunk = todo[start:start + PREFILL_CHUNK]
            if self.prefill_delay:
                time.sleep(self.prefill_delay * len(chunk))
            s.tokens.extend(chunk)
            if progress:
                progress(min(start + PREFILL_CHUNK, len(todo)), len(todo))
        if kv_cache is not None:
            kv_cache.after_prefill(s, ids)
        self.eval_log.append(len(todo))
        self.sampled.append(0)
        with self._lock:
            reply = self._replies.pop(0) if self._replies else None
        self._current = reply if reply is not None else self._encode(self.default)
        return len(todo)

    def sampler(self, params):
        return params

    def next_token(self, sampler, greedy=False):
        if self.token_delay:
            time.sleep(self.token_delay)
        self.sampled[-1] += 1
        return self._current.pop(0) if self._current else self.tokenizer.eos_id

    def accept(self, token):
        self.session.tokens.append(token)

    def limit(self, max_tokens):
        pass

    def finish(self):
        pass

    def reset(self):
        self.session.rewind(0)


def load_engine(model_path, *, ctx, backend="auto", threads=None, warm_weights=False,
                numerics="qat"):
    """A ModelEngine on a model file (ds4.Error with one line if it cannot load)."""
    from ..model import load
    try:
        model = load(model_path, backend=backend, ctx=ctx, threads=threads, numerics=numerics)
        if warm_weights and model.backend == "cpu":
            model.warm()
        model.tokenizer
    except (OSError, ValueError) as exc:
        raise Error(str(exc)) from None
    return ModelEngine(model, ctx)
