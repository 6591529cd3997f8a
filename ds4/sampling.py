"""Token sampling in native code (prompt-and-server.md §6)."""
import time

import numpy as np

from .native import ffi, lib


class Sampler:
    """temperature -> top-k -> min-p -> top-p, seeded xorshift64*; temperature 0 is greedy."""

    def __init__(self, temperature=1.0, top_k=0, top_p=1.0, min_p=0.05, seed=None):
        if seed is None or seed <= 0:
            seed = time.time_ns() ^ id(self)
        self.greedy = temperature <= 0   # the first largest finite logit (Session.decode_greedy's choice)
        self._s = ffi.new("ds4_sampler *")
        lib.ds4_sampler_init(self._s, float(temperature), int(top_k), float(top_p), float(min_p),
                             int(seed) & (2**64 - 1))

    @property
    def min_p_only(self):
        """Draws among the tokens whose weight reaches min_p > 0 (top_k 0, top_p
        1, temperature > 0; the defaults): what a GPU draws on its own
        (Session.decode_sampled)."""
        return bool(lib.ds4_sampler_min_p_only(self._s))

    @property
    def state(self):
        """The xorshift64* state: the next draws follow from it alone."""
        return int(self._s.rng)

    @state.setter
    def state(self, value):
        self._s.rng = int(value) & (2**64 - 1)

    def sample(self, logits):
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        return int(lib.ds4_sample(self._s, ffi.from_buffer("float[]", logits), logits.size))
