"""Sessions: one independent KV state over a loaded model."""
import os

import numpy as np

from .errors import Error
from .native import ffi, lib

NUMERICS = {"exact": lib.DS4_NUMERICS_EXACT, "qat": lib.DS4_NUMERICS_QAT,
            "qat-q8": lib.DS4_NUMERICS_QAT_Q8}


def _err(buf):
    return ffi.string(buf).decode("utf-8", "replace")


class Session:
    """A KV state: feed tokens with `eval`, go back with `rewind`, persist with `save`."""

    def __init__(self, model, ctx=None, *, numerics=None, threads=None):
        self.model = model   # keeps the weights mapped while the session lives
        self.ctx = int(ctx if ctx is not None else model.ctx)
        self.numerics = numerics or model.numerics
        err = ffi.new("char[512]")
        out = ffi.new("ds4_session **")
        n_threads = threads if threads is not None else (model.threads or 0)
        if lib.ds4_session_new(model._handle, self.ctx, NUMERICS[self.numerics], n_threads, out,
                               err, len(err)) != 0:
            raise Error(_err(err))
        self._s = ffi.gc(out[0], lib.ds4_session_free)
        self._vocab = model.config.n_vocab

    @property
    def n_tokens(self):
        return lib.ds4_session_n_tokens(self._s)

    @property
    def tokens(self):
        n = self.n_tokens
        return np.frombuffer(ffi.buffer(lib.ds4_session_tokens(self._s), 4 * n), np.int32).tolist()

    @property
    def logits(self):
        """Logits after the last token (None when unknown, e.g. right after a rewind)."""
        p = lib.ds4_session_logits(self._s)
        if p == ffi.NULL:
            return None
        return np.frombuffer(ffi.buffer(p, 4 * self._vocab), np.float32).copy()

    @property
    def prefill_chunk(self):
        """Tokens the backend takes per forward call (longer evals are split)."""
        return lib.ds4_model_prefill_chunk(self.model._handle)

    @property
    def kv_bytes(self):
        """Bytes of KV state held now, as the backend stores it (float32 rows; a
        CUDA qat session's compressed rows as FP8 / FP4 codes and scales)."""
        return lib.ds4_session_kv_bytes(self._s)

    def eval(self, ids, *, all_logits=False):
        """Appends ids; returns float32 logits [vocab], or [len(ids), vocab] if all_logits."""
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if ids.size == 0:
            raise ValueError("eval() needs at least one token id")
        if ids.min() < 0 or ids.max() >= self._vocab:
            raise ValueError(f"token ids must be in 0..{self._vocab - 1}")
        ids32 = ids.astype(np.int32)
        out = np.empty((len(ids32), self._vocab) if all_logits else (self._vocab,), np.float32)
        err = ffi.new("char[512]")
        rc = lib.ds4_session_eval(self._s, ffi.from_buffer("int32_t[]", ids32), len(ids32),
                                  ffi.from_buffer("float[]", out), int(all_logits), err, len(err))
        if rc != 0:
            raise Error(_err(err))
        return out

    def decode_greedy(self, first, n, *, except_id=None):
        """Feeds `first` and then n - 1 greedy choices (the first largest finite
        logit, never `except_id`); returns the n choices, the last not fed. The
        same tokens and logits as `eval` and an argmax a token; on CUDA the
        steps follow one another on the GPU, the host reading the choices once.
        Where no logit is finite the list ends early with -1, the tokens before
        it fed."""
        except_id = -1 if except_id is None else int(except_id)
        return self._decode_steps("decode_greedy", first, n, lambda first, n, out, err: lib.ds4_session_decode_greedy(
            self._s, first, n, except_id, ffi.from_buffer("int32_t[]", out), err, len(err)))

    def decode_sampled(self, first, n, sampler):
        """Feeds `first` and then n - 1 tokens drawn by `sampler` (a Sampler
        with temperature > 0), each from the logits after the one before;
        returns (the n draws, the last not fed; the sampler's state after
        each). The same tokens, logits and states as `eval` and
        Sampler.sample a token, and the sampler is left after the last draw;
        on CUDA a min-p sampler (top_k 0, top_p 1, min_p > 0) draws on the GPU,
        the host reading the draws once. Where no logit is finite the lists
        end early with -1, the tokens before it fed."""
        if sampler.greedy:
            raise ValueError("decode_sampled() needs a sampler with temperature > 0 (decode_greedy otherwise)")
        states = np.empty(max(int(n), 0), np.uint64)
        toks = self._decode_steps("decode_sampled", first, n, lambda first, n, out, err: lib.ds4_session_decode_sampled(
            self._s, first, n, sampler._s, ffi.from_buffer("int32_t[]", out), ffi.from_buffer("uint64_t[]", states),
            err, len(err)))
        return toks, states[:len(toks)].tolist()

    def _decode_steps(self, name, first, n, call):
        """decode_greedy's and decode_sampled's checks and result: call(first,
        n, out, err) runs the native steps into out; the choices made (cut at
        a -1 where no logit was finite after a token fed)."""
        n = int(n)
        if n <= 0:
            raise ValueError(f"{name}() needs n >= 1")
        first = int(first)
        if not 0 <= first < self._vocab:
            raise ValueError(f"token ids must be in 0..{self._vocab - 1}")
        out = np.empty(n, np.int32)
        err = ffi.new("char[512]")
        n_before = self.n_tokens
        if call(first, n, out, err) != 0:
            fed = self.n_tokens - n_before
            if fed == 0 or out[fed - 1] >= 0:
                raise Error(_err(err))
            return out[:fed].tolist()   # no finite logit after the last token fed
        return out.tolist()

    def rewind(self, n):
        """Keeps the first n tokens; the state is exactly that of feeding only them."""
        err = ffi.new("char[512]")
        if lib.ds4_session_rewind(self._s, int(n), err, len(err)) != 0:
            raise Error(_err(err))

    def save(self, path, *, compact=False):
        """Writes a snapshot atomically (temporary file, fsync, rename). A compact
        one holds only what going on from the current tokens needs: much smaller,
        but the restored session replays its tokens to rewind below its length."""
        err = ffi.new("char[512]")
        if lib.ds4_session_save(self._s, os.fspath(path).encode(), int(compact), err,
                                len(err)) != 0:
            raise Error(_err(err))

    def load(self, path):
        """Replaces this session's state with a snapshot's. A corrupt, truncated
        or foreign file raises ds4.Error and leaves the state as it was, or
        empty when the damage shows only after the checksum passed."""
        err = ffi.new("char[512]")
        if lib.ds4_session_restore(self._s, os.fspath(path).encode(), err, len(err)) != 0:
            raise Error(_err(err))

    @classmethod
    def restore(cls, model, path, *, ctx=None, numerics=None):
        """A new session from a snapshot (refused if corrupt or from another model)."""
        s = cls(model, ctx, numerics=numerics)
        s.load(path)
        return s
