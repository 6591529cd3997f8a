"""generation.Stepper: tokens fed ahead by Session.decode_greedy and
decode_sampled (the backend's own steps) give the tokens, the state and the
sampler states of feeding each drawn token by eval. On the CPU both run the
core's steps, the same contract the CUDA backend keeps (tests/test_cuda.py
holds its steps to eval and the host's draws bit for bit)."""
import numpy as np
import pytest

import ds4
from ds4 import generation
from ds4.generation import Generation, Stepper, stream
from ds4.sampling import Sampler
from ds4.server.engine import ModelEngine

from conftest import sampled_by_eval

PROMPT = [5, 17, 400, 9, 1234, 88, 7]


@pytest.fixture(scope="module")
def model(tiny_q2):
    with ds4.load(tiny_q2, numerics="exact", ctx=256) as m:
        yield m


def _same_state(a, b):
    """The two sessions hold the same tokens, and feeding one more gives the same bits."""
    assert a.tokens == b.tokens
    np.testing.assert_array_equal(a.eval([3]), b.eval([3]))


def _generate(model, device_steps, **kw):
    s = model.session()
    result = Generation()
    text = "".join(stream(s, model.tokenizer, PROMPT, sampler=Sampler(temperature=0), result=result,
                          device_steps=device_steps, **kw))
    return s, result, text


@pytest.mark.parametrize("max_tokens", [1, 3, 8, 21])
def test_greedy_tokens_fed_ahead_equal_those_fed_one_by_one(model, max_tokens, monkeypatch):
    monkeypatch.setattr(generation, "GREEDY_PIECE", 8)   # replies shorter, as long and longer than a piece
    a, ra, ta = _generate(model, True, max_tokens=max_tokens)
    b, rb, tb = _generate(model, False, max_tokens=max_tokens)
    assert (ra.tokens, ta, ra.finish_reason) == (rb.tokens, tb, rb.finish_reason)
    assert len(ra.tokens) == max_tokens
    assert a.tokens == PROMPT + ra.tokens   # every drawn token fed, none of the ones fed ahead kept
    _same_state(a, b)


def test_a_stop_string_inside_a_piece_keeps_only_the_accepted_tokens(model, monkeypatch):
    monkeypatch.setattr(generation, "GREEDY_PIECE", 8)
    _, ref, text = _generate(model, False, max_tokens=20)
    # a stop string that ends inside the reply: the token completing it is not fed
    cut = len(model.tokenizer.decode(ref.tokens[:5]))
    stop = text[cut - 2:cut] if cut >= 2 else text[:2]
    assert stop
    a, ra, ta = _generate(model, True, max_tokens=20, stop=[stop])
    b, rb, tb = _generate(model, False, max_tokens=20, stop=[stop])
    assert (ra.tokens, ta, ra.finish_reason) == (rb.tokens, tb, "stop")
    assert len(ra.tokens) < 20
    _same_state(a, b)


def test_sampled_draws_between_greedy_ones_see_the_accepted_tokens(model, monkeypatch):
    monkeypatch.setattr(generation, "GREEDY_PIECE", 4)
    order = "gggsgggggsgg"   # a sampled draw where greedy tokens were fed ahead, and where not

    def run(device_steps):
        s = model.session()
        steps = Stepper(s, s.eval(PROMPT), device_steps=device_steps)
        samplers = {"g": Sampler(temperature=0), "s": Sampler(temperature=1.5, min_p=0, seed=11)}
        drawn = []
        for kind in order:
            drawn.append(steps.draw(samplers[kind]))
            steps.accept(drawn[-1])
        steps.draw(samplers["g"])   # drawn, not accepted: it does not stay in the state
        steps.settle()
        return s, drawn

    (a, da), (b, db) = run(True), run(False)
    assert da == db
    assert a.tokens == PROMPT + da
    _same_state(a, b)


def test_decode_sampled_equals_eval_and_a_draw_a_token(model):
    a, b = model.session(), model.session()
    first = int(np.argmax(a.eval(PROMPT)))
    b.eval(PROMPT)
    sa, sb = Sampler(temperature=1.2, min_p=0.02, seed=7), Sampler(temperature=1.2, min_p=0.02, seed=7)
    got, states = a.decode_sampled(first, 9, sa)
    assert (got, states) == sampled_by_eval(b, sb, first, 9)
    assert sa.state == sb.state and a.tokens == PROMPT + [first] + got[:-1]
    _same_state(a, b)


def test_sampled_draws_fed_ahead_equal_those_drawn_one_by_one(model, monkeypatch):
    """A min-p sampler's draws chained by decode_sampled: the same tokens, state
    and sampler state as drawing each from eval's logits, also where another
    sampler draws in between (greedy; top-k, which is not chained), and where
    a chained draw is drawn again before it is accepted (a new draw, from the
    state the first one left)."""
    monkeypatch.setattr(generation, "GREEDY_PIECE", 4)

    def run(device_steps):
        s = model.session()
        steps = Stepper(s, s.eval(PROMPT), device_steps=device_steps)
        samplers = {"s": Sampler(temperature=1.5, min_p=0.02, seed=11), "g": Sampler(temperature=0),
                    "k": Sampler(temperature=1.0, top_k=5, seed=3)}
        drawn = []
        for kind in "sssssssgssskssssss":
            drawn.append(steps.draw(samplers[kind]))
            steps.accept(drawn[-1])
        steps.draw(samplers["s"])
        drawn.append(steps.draw(samplers["s"]))
        steps.accept(drawn[-1])
        steps.draw(samplers["s"])   # drawn, not accepted: it does not stay in the state
        steps.settle()
        return s, drawn, samplers["s"].state

    (a, da, ra), (b, db, rb) = run(True), run(False)
    assert (da, ra) == (db, rb)
    assert a.tokens == PROMPT + da
    _same_state(a, b)


@pytest.mark.parametrize("first", ["g", "s"])
def test_another_samplers_draw_after_a_chain_ran_out_sees_the_last_logits(model, first, monkeypatch):
    """Every token a chain fed accepted, its last choice not: the next draw by
    another sampler is made from the logits after the last accepted token (it
    once got none, drew -1, and the reply ended there)."""
    monkeypatch.setattr(generation, "GREEDY_PIECE", 4)

    def run(device_steps):
        s = model.session()
        steps = Stepper(s, s.eval(PROMPT), device_steps=device_steps)
        samplers = {"g": Sampler(temperature=0), "s": Sampler(temperature=1.5, min_p=0.02, seed=11),
                    "k": Sampler(temperature=1.0, top_k=5, seed=3)}
        drawn = []
        for kind in first * 4 + "k":   # the first draw's token starts a chain of 4: 3 fed ahead
            drawn.append(steps.draw(samplers[kind]))
            steps.accept(drawn[-1])
        steps.settle()
        return s, drawn

    (a, da), (b, db) = run(True), run(False)
    assert da == db and min(da) >= 0
    _same_state(a, b)


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_server_engine_leaves_exactly_the_accepted_tokens(model, temperature):
    def run(device_steps):
        eng = ModelEngine(model, ctx=256)
        eng._device_steps = device_steps
        eng.prefill(PROMPT)
        sampler = eng.sampler(type("P", (), dict(temperature=temperature, top_k=0, top_p=1.0, min_p=0.05,
                                                 seed=1))())
        toks = []
        for _ in range(11):
            toks.append(eng.next_token(sampler))
            eng.accept(toks[-1])
        eng.next_token(sampler)
        eng.finish()
        return eng.session, toks

    (a, ta), (b, tb) = run(True), run(False)
    assert ta == tb and a.tokens == PROMPT + ta
    _same_state(a, b)


class _CountingSession:
    """A session whose decode_greedy calls are counted (everything else passes through)."""

    def __init__(self, session):
        self._s, self.fed_ahead = session, []

    def __getattr__(self, name):
        return getattr(self._s, name)

    def decode_greedy(self, first, n, **kw):
        self.fed_ahead.append(n)
        return self._s.decode_greedy(first, n, **kw)


@pytest.mark.parametrize("max_tokens", [1, 5, 20])
def test_no_greedy_step_is_fed_ahead_past_the_last_draw(model, max_tokens, monkeypatch):
    """A reply of max_tokens feeds exactly max_tokens tokens, not a piece more
    (a one-token server reply must not pay for 16 steps)."""
    monkeypatch.setattr(generation, "GREEDY_PIECE", 8)
    s = _CountingSession(model.session())
    result = Generation()
    list(stream(s, model.tokenizer, PROMPT, max_tokens=max_tokens, sampler=Sampler(temperature=0),
                result=result, device_steps=True))
    assert len(result.tokens) == max_tokens and sum(s.fed_ahead) == max_tokens
    assert s.tokens == PROMPT + result.tokens


class _FedCountingSession:
    """A session counting every token its evals and chained steps feed."""

    def __init__(self, session):
        self._s, self.fed = session, 0

    def __getattr__(self, name):
        return getattr(self._s, name)

    def eval(self, ids, **kw):
        self.fed += len(ids)
        return self._s.eval(ids, **kw)

    def decode_greedy(self, first, n, **kw):
        self.fed += n
        return self._s.decode_greedy(first, n, **kw)

    def decode_sampled(self, first, n, sampler):
        self.fed += n
        return self._s.decode_sampled(first, n, sampler)


def test_samplers_taking_turns_shorten_the_chains(model):
    """A tool call's greedy structure and sampled strings take turns every few
    tokens: each turn cuts a chain, and the tokens it fed past the cut are
    fed again. Chains halve at a cut (and double when drawn to their end), so
    56 draws in 16 turns feed at most 2.5 tokens a draw (whole 16-token
    chains fed 271), and the draws are those of eval a token."""
    order = ("ssss" + "ggg") * 8
    runs = []
    for device_steps in (True, False):
        s = _FedCountingSession(model.session())
        steps = Stepper(s, s.eval(PROMPT), device_steps=device_steps)
        s.fed = 0
        samplers = {"s": Sampler(temperature=1.5, min_p=0.02, seed=11), "g": Sampler(temperature=0)}
        drawn = []
        for kind in order:
            drawn.append(steps.draw(samplers[kind]))
            steps.accept(drawn[-1])
        steps.settle()
        runs.append((s, drawn))
    (a, da), (b, db) = runs
    assert da == db and b.fed == len(order)
    assert a.fed <= 2.5 * len(order), f"{a.fed} tokens fed for {len(order)} draws"
    _same_state(a, b)

