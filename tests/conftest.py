import os
import signal
import sys

import pytest

import ds4

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (gguf_header, load_worker)


def subprocess_env():
    """Environment for child Pythons: they import the same ds4 as this process
    (installed, or the in-place build). Run them with a working directory outside
    the checkout: `python -m` puts the working directory before PYTHONPATH."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(ds4.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def greedy_by_eval(session, first, n, except_id):
    """Session.decode_greedy's choices the plain way: eval a token, numpy's argmax
    of its logits (except_id masked), n times from `first`."""
    import numpy as np
    choices, tok = [], first
    for _ in range(n):
        logits = session.eval([tok])
        if except_id is not None:
            logits[except_id] = -np.inf
        tok = int(np.argmax(logits))
        choices.append(tok)
    return choices


def sampled_by_eval(session, sampler, first, n):
    """Session.decode_sampled's draws the plain way: eval a token, the host's
    draw from its logits, n times from `first`; the tokens and the sampler's
    state after each."""
    tok, toks, states = first, [], []
    for _ in range(n):
        tok = sampler.sample(session.eval([tok]))
        toks.append(tok)
        states.append(sampler.state)
    return toks, states


def default_sigint():
    """preexec_fn for a child a test interrupts: SIGINT at its default, so the
    child's Python installs its KeyboardInterrupt handler even where the test
    run itself started with SIGINT ignored (a background job of a
    non-interactive shell: there both Ctrl+C tests failed)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def tiny_config():
    from ds4.testing import ModelConfig
    return ModelConfig.tiny()


@pytest.fixture(scope="session")
def tiny_q2(tmp_path_factory, tiny_config):
    from ds4.testing import write_model
    path = tmp_path_factory.mktemp("models") / "tiny-q2.gguf"
    write_model(path, tiny_config, variant="q2", seed=1)
    return path


@pytest.fixture(scope="session")
def tiny_q4(tmp_path_factory, tiny_config):
    from ds4.testing import write_model
    path = tmp_path_factory.mktemp("models") / "tiny-q4.gguf"
    write_model(path, tiny_config, variant="q4", seed=2)
    return path
