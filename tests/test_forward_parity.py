"""The CPU forward pass against transformers' DeepseekV4ForCausalLM (float64, eager)
on the same dequantized weights, in `exact` numerics (forward-pass.md §9)."""
import numpy as np
import pytest

import ds4
from ds4.testing import ModelConfig, write_model

torch = pytest.importorskip("torch")
hf_reference = pytest.importorskip("hf_reference")

TOL = 1e-4          # max |Δlogit| / max |logit|, per position
ARGMAX_AGREE = 0.995

CONFIGS = {
    # every layer kind, compression firing within a few tokens, top-k < rows
    "tiny": (ModelConfig.tiny(), "q2", 48),
    # the real 4 / 128 ratios and the real 128-token window, a few hundred tokens
    "real-ratios": (ModelConfig.tiny(compress_ratios=(0, 0, 4, 128, 4, 128), sliding_window=128,
                                     indexer_top_k=16), "q4", 300),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    config, variant, n_tokens = CONFIGS[request.param]
    path = tmp_path_factory.mktemp("parity") / f"{request.param}.gguf"
    write_model(path, config, variant=variant, seed=7)
    ids = np.random.default_rng(3).integers(3, config.vocab_size, n_tokens).tolist()
    ids[0] = 0   # BOS
    hf = hf_reference.hf_model_from_gguf(path)
    want = hf_reference.hf_logits(hf, ids)
    model = ds4.load(path, numerics="exact")
    yield model, ids, want, request.param
    model.close()


def assert_close(got, want, what):
    got = np.asarray(got, np.float64).reshape(-1, want.shape[-1])
    want = want.reshape(-1, want.shape[-1])
    rel = np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)
    agree = (got.argmax(axis=1) == want.argmax(axis=1)).mean()
    assert rel.max() <= TOL, f"{what}: worst position {rel.argmax()} rel {rel.max():.2e}"
    assert agree >= ARGMAX_AGREE, f"{what}: argmax agreement {agree:.3f}"


def test_prefill_logits_match_transformers_at_every_position(case):
    model, ids, want, name = case
    s = model.session(ctx=1024)
    assert_close(s.eval(ids, all_logits=True), want, f"{name} prefill")


def test_chunked_prefill_equals_one_shot(case):
    model, ids, want, name = case
    one = model.session(ctx=1024).eval(ids, all_logits=True)
    s = model.session(ctx=1024)
    parts = [s.eval(ids[a:b], all_logits=True) for a, b in ((0, 5), (5, 6), (6, 37), (37, len(ids)))]
    np.testing.assert_array_equal(np.concatenate(parts), one)


def test_decode_after_rewind_matches_transformers(case):
    model, ids, want, name = case
    s = model.session(ctx=1024)
    s.eval(ids)
    k = len(ids) // 2
    s.rewind(k)
    assert s.n_tokens == k
    got = np.stack([s.eval([t]) for t in ids[k:]])
    assert_close(got, want[k:], f"{name} decode after rewind")


def test_deep_rewind_replays_exactly(case):
    model, ids, want, name = case
    s = model.session(ctx=1024)
    s.eval(ids)
    s.rewind(3)   # may be deeper than the in-memory rewind window: replays
    got = s.eval(ids[3:], all_logits=True)
    assert_close(got, want[3:], f"{name} after a deep rewind")


def test_save_restore_round_trip_continues_identically(case, tmp_path):
    model, ids, want, name = case
    k = 2 * len(ids) // 3
    s = model.session(ctx=1024)
    s.eval(ids[:k])
    path = tmp_path / "state.ds4s"
    s.save(path)
    r = ds4.Session.restore(model, path, ctx=1024)
    assert r.n_tokens == k and r.tokens == ids[:k]
    np.testing.assert_array_equal(r.logits, s.logits)
    got = r.eval(ids[k:], all_logits=True)
    np.testing.assert_array_equal(got, s.eval(ids[k:], all_logits=True))
    assert_close(got, want[k:], f"{name} after restore")


def test_reference_holds_random_values_where_transformers_initialises_constants(tmp_path):
    """Sinks, position biases, HC base/scale, correction bias and the hash table come
    from the file, not from transformers' zero/one initialisation that would hide bugs."""
    path = tmp_path / "tiny.gguf"
    write_model(path, ModelConfig.tiny(), variant="q2", seed=11)
    hf = hf_reference.hf_model_from_gguf(path)
    state = hf.state_dict()
    suffixes = ("self_attn.sinks", "compressor.position_bias", "indexer.position_bias",
                "attn_hc.base", "attn_hc.scale", "ffn_hc.base", "ffn_hc.scale",
                "mlp.gate.e_score_correction_bias", "mlp.gate.tid2eid", "hc_head.hc_base",
                "hc_head.hc_scale", "input_layernorm.weight", "kv_norm.weight")
    for suffix in suffixes:
        found = [k for k in state if k.endswith(suffix)]
        assert found, suffix
        for k in found:
            values = state[k].double().flatten()
            assert values.numel() == 1 or values.std() > 0, f"{k} is constant"
            assert not torch.all(values == 0) and not torch.all(values == 1), f"{k} is trivial"
