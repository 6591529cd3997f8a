"""Native sampling against a numpy implementation written from prompt-and-server.md §6."""
import numpy as np
import pytest

from ds4.sampling import Sampler

MASK = 2**64 - 1


class SpecRng:
    def __init__(self, seed):
        self.state = seed or 0x9E3779B97F4A7C15

    def uniform(self):
        x = self.state
        x ^= x >> 12
        x ^= (x << 25) & MASK
        x ^= x >> 27
        self.state = x
        return (((x * 0x2545F4914F6CDD1D) & MASK) >> 40) / 2**24


def spec_sample(logits, rng, temperature, top_k, top_p, min_p):
    logits = np.asarray(logits, np.float64)
    finite = np.isfinite(logits)
    if temperature <= 0:
        return int(np.flatnonzero(logits == logits[finite].max())[0])
    top_p = top_p if 0 < top_p <= 1 else 1.0
    min_p = max(min_p, 0.0)
    top_k = min(top_k, 1024)
    lmax = logits[finite].max()
    if top_k == 0 and top_p == 1:
        ids = np.flatnonzero(finite)
        w = np.exp((logits[ids] - lmax) / temperature)
        ids, w = ids[w >= min_p], w[w >= min_p]
    else:
        ids = np.flatnonzero(finite)
        ids = ids[np.lexsort((ids, -logits[ids]))]
        if top_k:
            ids = ids[:top_k]
        w = np.exp((logits[ids] - lmax) / temperature)
        p = w / w.sum()
        # walk down the candidates: stop before the first (after the top)
        # with p < p_top * min_p, or after the one where the running mass
        # reaches top_p (cumsum: the running sum, one addition at a time)
        below = np.flatnonzero(p[1:] < p[0] * min_p)
        kept = 1 + below[0] if len(below) else len(ids)
        reached = np.flatnonzero(np.cumsum(w) / w.sum() >= top_p)
        if len(reached):
            kept = min(kept, reached[0] + 1)
        ids, w = ids[:kept], w[:kept]
    r = rng.uniform() * w.sum()
    return int(ids[min(np.searchsorted(np.cumsum(w), r, side="right"), len(ids) - 1)])


@pytest.mark.parametrize("params", [
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.05),
    dict(temperature=0.7, top_k=40, top_p=1.0, min_p=0.0),
    dict(temperature=1.3, top_k=0, top_p=0.9, min_p=0.05),
    dict(temperature=0.5, top_k=100, top_p=0.8, min_p=0.1),
    dict(temperature=1.0, top_k=5000, top_p=2.0, min_p=-1.0),   # sanitised
])
def test_native_sampler_equals_spec_reference(params):
    rng = np.random.default_rng(0)
    native = Sampler(seed=1234, **params)
    ref_rng = SpecRng(1234)
    for _ in range(200):
        logits = (rng.standard_normal(2000) * 3).astype(np.float32)
        logits[rng.integers(0, 2000, 5)] = -np.inf
        assert native.sample(logits) == spec_sample(logits, ref_rng, **params)


FLASH_VOCAB = 129280


@pytest.mark.parametrize("params", [
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.05),   # the server's default
    dict(temperature=0.7, top_k=0, top_p=0.95, min_p=0.05),
    dict(temperature=1.0, top_k=0, top_p=0.95, min_p=0.0),   # a nucleus of thousands
    dict(temperature=0.7, top_k=40, top_p=0.9, min_p=0.0),
    dict(temperature=1.0, top_k=1024, top_p=1.0, min_p=0.0),
])
def test_native_sampler_equals_spec_reference_at_flash_vocab(params):
    """The native sampler looks only at the candidates that can be drawn
    (a heap of the best k, a min-p bound, a growing sorted prefix for top-p);
    at Flash's vocabulary, with ties, infinities and NaNs among the logits,
    it draws what sorting everything draws."""
    rng = np.random.default_rng(3)
    native = Sampler(seed=99, **params)
    ref_rng = SpecRng(99)
    for i in range(6):
        logits = (rng.standard_normal(FLASH_VOCAB) * (3 if i % 2 else 1)).astype(np.float32)
        if i >= 2:   # a tie across the top-k boundary and non-finite values
            logits = np.round(logits, 1)
            logits[rng.integers(0, FLASH_VOCAB, 50)] = np.nan
            logits[rng.integers(0, FLASH_VOCAB, 50)] = -np.inf
        for _ in range(3):
            assert native.sample(logits) == spec_sample(logits, ref_rng, **params)


def test_greedy_skips_nan_and_infinity_at_any_position():
    logits = np.zeros(FLASH_VOCAB + 3, np.float32)
    logits[[5, 70000, FLASH_VOCAB + 2]] = [np.nan, np.inf, np.inf]
    logits[[17, 90001]] = 2.5
    assert Sampler(temperature=0).sample(logits) == 17
    logits[:] = -np.inf
    logits[FLASH_VOCAB + 1] = -1e30   # the only finite one, in the tail
    assert Sampler(temperature=0).sample(logits) == FLASH_VOCAB + 1


@pytest.mark.parametrize("params", [
    dict(temperature=0.0),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.7, top_p=0.95, min_p=0.05),
    dict(temperature=0.7, top_k=40, min_p=0.0),
], ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_bench_sample_flash_vocab(benchmark, params):
    """One draw from Flash's 129,280 logits (pytest-benchmark; skipped in the
    default run): the sampler's share of a decoded token."""
    logits = (np.random.default_rng(4).standard_normal(FLASH_VOCAB) * 3).astype(np.float32)
    sampler = Sampler(seed=5, **params)
    tok = benchmark(sampler.sample, logits)
    assert 0 <= tok < FLASH_VOCAB and np.isfinite(logits[tok])


def test_temperature_zero_is_first_argmax():
    logits = np.array([1.0, 5.0, -np.inf, 5.0, 2.0], np.float32)
    assert Sampler(temperature=0).sample(logits) == 1


def test_same_seed_same_tokens_different_seed_differs():
    logits = np.random.default_rng(1).standard_normal(50000).astype(np.float32)
    a = [Sampler(seed=7).sample(logits) for _ in range(3)]
    s1, s2 = Sampler(seed=7, min_p=0), Sampler(seed=8, min_p=0)
    seq1 = [s1.sample(logits) for _ in range(20)]
    seq2 = [s2.sample(logits) for _ in range(20)]
    assert a[0] == a[1] == a[2]
    assert seq1 != seq2


def test_no_finite_logit_gives_minus_one():
    assert Sampler(temperature=1).sample(np.full(10, np.nan, np.float32)) == -1
