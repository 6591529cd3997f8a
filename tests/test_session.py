"""Session behaviour that needs no reference model: errors, state bookkeeping, snapshots."""
import os
import struct

import numpy as np
import pytest

import ds4
from conftest import greedy_by_eval


@pytest.fixture(scope="module")
def model(tiny_q2):
    with ds4.load(tiny_q2, numerics="exact") as m:
        yield m


IDS = [0, 17, 400, 9, 1234, 88, 7, 65000, 3, 3, 3, 42, 100000, 5, 6, 7]


def test_out_of_vocabulary_id_is_refused_and_state_kept(model):
    s = model.session(ctx=64)
    s.eval(IDS[:4])
    with pytest.raises(ValueError, match="token ids"):
        s.eval([5, model.config.n_vocab])
    assert s.n_tokens == 4


def test_context_full_is_a_clear_error(model):
    s = model.session(ctx=8)
    s.eval(IDS[:6])
    with pytest.raises(ds4.Error, match="context full"):
        s.eval(IDS[6:10])
    assert s.n_tokens == 6


def test_rewind_beyond_the_state_is_refused(model):
    s = model.session(ctx=64)
    s.eval(IDS[:4])
    with pytest.raises(ds4.Error, match="cannot rewind"):
        s.rewind(5)


def test_rewind_then_same_tokens_gives_same_logits(model):
    s = model.session(ctx=64)
    first = s.eval(IDS, all_logits=True)
    s.rewind(5)
    assert s.tokens == IDS[:5] and s.logits is None
    np.testing.assert_array_equal(s.eval(IDS[5:], all_logits=True), first[5:])


def test_qat_numerics_stay_close_to_exact_but_differ(tiny_q2):
    with ds4.load(tiny_q2, numerics="qat") as m:
        qat = m.session(ctx=64).eval(IDS, all_logits=True)
    exact = None
    with ds4.load(tiny_q2, numerics="exact") as m:
        exact = m.session(ctx=64).eval(IDS, all_logits=True)
    assert np.isfinite(qat).all()
    rel = np.abs(qat - exact).max() / np.abs(exact).max()
    assert 0 < rel < 0.5


def test_qat_q8_numerics_stay_close_to_qat_but_differ(tiny_q2):
    with ds4.load(tiny_q2, numerics="qat-q8") as m:
        q8 = m.session(ctx=64).eval(IDS, all_logits=True)
    with ds4.load(tiny_q2, numerics="qat") as m:
        qat = m.session(ctx=64).eval(IDS, all_logits=True)
    assert np.isfinite(q8).all()
    rel = np.abs(q8 - qat).max() / np.abs(qat).max()
    assert 0 < rel < 0.5


def test_snapshot_of_another_model_is_refused(model, tiny_q4, tmp_path):
    s = model.session(ctx=64)
    s.eval(IDS[:5])
    s.save(tmp_path / "a.ds4s")
    with ds4.load(tiny_q4, numerics="exact") as other:
        with pytest.raises(ds4.Error, match="different model file"):
            ds4.Session.restore(other, tmp_path / "a.ds4s", ctx=64)


def test_corrupt_or_truncated_snapshot_is_refused(model, tmp_path):
    s = model.session(ctx=64)
    s.eval(IDS)
    path = tmp_path / "s.ds4s"
    s.save(path)
    blob = path.read_bytes()
    for i, bad in enumerate([blob[:len(blob) // 2], blob[:-1],
                             blob[:100] + bytes([blob[100] ^ 1]) + blob[101:], b"junk" * 10]):
        p = tmp_path / f"bad{i}.ds4s"
        p.write_bytes(bad)
        with pytest.raises(ds4.Error):
            ds4.Session.restore(model, p, ctx=64)
    with pytest.raises(ds4.Error, match="cannot open"):
        ds4.Session.restore(model, tmp_path / "missing.ds4s", ctx=64)


def test_snapshot_larger_than_ctx_is_refused(model, tmp_path):
    s = model.session(ctx=64)
    s.eval(IDS)
    s.save(tmp_path / "s.ds4s")
    with pytest.raises(ds4.Error, match="ctx"):
        ds4.Session.restore(model, tmp_path / "s.ds4s", ctx=8)


def test_save_leaves_no_temporary_file(model, tmp_path):
    s = model.session(ctx=64)
    s.eval(IDS[:3])
    s.save(tmp_path / "s.ds4s")
    assert os.listdir(tmp_path) == ["s.ds4s"]


def test_save_to_an_unwritable_place_is_a_clear_error(model, tmp_path):
    s = model.session(ctx=64)
    s.eval(IDS[:3])
    with pytest.raises(ds4.Error, match="cannot write"):
        s.save(tmp_path / "no-such-dir" / "s.ds4s")


def test_kv_bytes_grow_with_compressed_rows(model):
    s = model.session(ctx=64)
    s.eval(IDS[:1])
    one = s.kv_bytes
    s.eval(IDS[1:])
    assert s.kv_bytes > one > 0


def test_session_outliving_its_closed_model_in_a_garbage_cycle_is_freed_safely(tiny_q2):
    """A collector may finalise a model before the sessions that point at it (a
    model and its live session form a cycle); freeing them must not crash."""
    import gc
    with ds4.load(tiny_q2, ctx=256) as ref:
        r = ref.session()
        r.eval([0, 5, 6])
        want = r.eval([7])       # chunked as below: a GPU's chunks and single tokens differ in bits
    for _ in range(3):
        m = ds4.load(tiny_q2, ctx=256)
        s = m.session()
        s.eval([0, 5, 6])
        m._live = s             # model -> session -> model
        m.__del__()              # as the collector may call it first
        np.testing.assert_array_equal(s.eval([7]), want)   # the weights are still there
        del m, s
        gc.collect()


# ---- compact snapshots ----

REWIND_BUDGET = 512   # session.c: ring entries kept beyond what the state needs


def snapshot_bytes(cfg, T, floor, logits_known):
    """The size of a snapshot of T tokens with rewind floor `floor`, from the
    layout: window rows from floor - (sliding_window - 1), compressor entries
    from the window open at the floor (the one before it too with the m = 4
    overlap), each no further back than its ring keeps."""
    d, dI, sw = cfg.head_dim, cfg.indexer_dim, cfg.sliding_window
    size = 8 + 11 * 8 + 3 * 8 + 4 * T + (4 * cfg.n_vocab if logits_known else 0) + 8
    for m in cfg.compress_ratios:
        size += 4 * d * (T - max(T - (sw + REWIND_BUDGET), floor - (sw - 1), 0))
        if not m:
            continue
        coff = 2 if m == 4 else 1
        kg = T - max(T - (2 * m + REWIND_BUDGET), (floor // m - (coff - 1)) * m, 0)
        size += 4 * (kg * 2 * coff * d + T // m * d)
        if m == 4:
            size += 4 * (kg * 4 * dI + T // m * dI)
    return size


@pytest.fixture(scope="module")
def ratio_model_path(tmp_path_factory):
    """The real 4 / 128 compression ratios and a 128-token window."""
    from ds4.testing import ModelConfig, write_model
    path = tmp_path_factory.mktemp("models") / "ratios.gguf"
    write_model(path, ModelConfig.tiny(compress_ratios=(0, 0, 4, 128, 4, 128),
                                       sliding_window=128, indexer_top_k=16), variant="q2", seed=3)
    return path


def long_ids(n, seed=0):
    return np.random.default_rng(seed).integers(1000, 60000, n).tolist()


# (model fixture, numerics, T restored at, tokens fed after it)
CASES = {"tiny-q2-exact": ("tiny_q2", "exact", 21, 11),
         "tiny-q4-qat": ("tiny_q4", "qat", 23, 11),
         "ratios-exact": ("ratio_model_path", "exact", 301, 90),
         "ratios-qat": ("ratio_model_path", "qat", 301, 90),
         "ratios-qat-q8": ("ratio_model_path", "qat-q8", 301, 90)}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    # bitwise comparisons of chunkings: the CPU engine gives one token the same
    # bits in any chunk; a GPU's tensor-core chunks do not match its one-token
    # decode bit for bit (tests/test_cuda.py holds it to its bar instead)
    fixture, numerics, T, k = CASES[request.param]
    with ds4.load(request.getfixturevalue(fixture), backend="cpu", numerics=numerics,
                  ctx=1024) as m:
        yield m, T, k


def compact_copy(m, s, path):
    """s saved compact and restored into a session whose rings hold other tokens,
    so a ring slot that the snapshot left out and the forward pass read shows."""
    s.save(path, compact=True)
    r = m.session()
    r.eval(long_ids(s.n_tokens + 40, seed=9))
    r.load(path)
    return r


def test_compact_restore_continues_bitwise_like_the_original(case, tmp_path):
    m, T, k = case
    ids = long_ids(T + k + 3)
    s = m.session()
    s.eval(ids[:T])
    r = compact_copy(m, s, tmp_path / "c.ds4s")
    assert r.tokens == ids[:T]
    np.testing.assert_array_equal(r.logits, s.logits)
    np.testing.assert_array_equal(r.eval(ids[T:T + k], all_logits=True),
                                  s.eval(ids[T:T + k], all_logits=True))
    for t in ids[T + k:]:
        np.testing.assert_array_equal(r.eval([t]), s.eval([t]))


def assert_rewind_continues_like_a_fresh_session(m, session, ids, n, k):
    """After rewind(n), the next k tokens give bitwise the logits of a session fed ids[:n]."""
    session.rewind(n)
    fresh = m.session()
    fresh.eval(ids[:n])
    np.testing.assert_array_equal(session.eval(ids[n:n + k], all_logits=True),
                                  fresh.eval(ids[n:n + k], all_logits=True))


def test_rewinds_after_a_compact_restore_equal_a_fresh_session(case, tmp_path):
    m, T, k = case
    ids = long_ids(T + k, seed=1)
    s = m.session()
    s.eval(ids[:T])
    r = compact_copy(m, s, tmp_path / "c.ds4s")
    r.eval(ids[T:])
    for n in (T + k // 2, T, T - 3, 1):     # above the floor: cheap; below: replayed
        assert_rewind_continues_like_a_fresh_session(m, r, ids, n, 6)


def test_full_snapshot_after_a_compact_restore_keeps_the_floor(case, tmp_path):
    """The rings below a compact restore's length hold other tokens' rows: a
    full snapshot taken later must not let its restore rewind cheaply there."""
    m, T, k = case
    ids = long_ids(T + k, seed=2)
    s = m.session()
    s.eval(ids[:T])
    r = compact_copy(m, s, tmp_path / "c.ds4s")
    r.eval(ids[T:])
    r.save(tmp_path / "full.ds4s")
    assert os.path.getsize(tmp_path / "full.ds4s") == snapshot_bytes(m.config, T + k, T, True)
    again = ds4.Session.restore(m, tmp_path / "full.ds4s")
    for n in (T + 1, T - 2):
        assert_rewind_continues_like_a_fresh_session(m, again, ids, n, 4)


def test_compact_snapshot_with_unknown_logits_can_evaluate_its_last_token_again(case, tmp_path):
    m, T, k = case
    ids = long_ids(T + 5, seed=3)
    s = m.session()
    s.eval(ids)
    s.rewind(T)
    assert s.logits is None
    s.save(tmp_path / "c.ds4s", compact=True)
    assert os.path.getsize(tmp_path / "c.ds4s") == snapshot_bytes(m.config, T, T - 1, False)
    r = ds4.Session.restore(m, tmp_path / "c.ds4s")
    assert_rewind_continues_like_a_fresh_session(m, r, ids, T - 1, len(ids) - (T - 1))


def test_snapshot_sizes_follow_the_layout(case, tmp_path):
    m, T, k = case
    s = m.session()
    for n in (1, T, T + k):
        s.eval(long_ids(n - s.n_tokens, seed=n))
        s.save(tmp_path / "full", compact=False)
        s.save(tmp_path / "compact", compact=True)
        assert os.path.getsize(tmp_path / "full") == snapshot_bytes(m.config, n, 0, True)
        assert os.path.getsize(tmp_path / "compact") == snapshot_bytes(m.config, n, n, True)
    assert os.path.getsize(tmp_path / "compact") < os.path.getsize(tmp_path / "full")


def fnv1a64(data):
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xffffffffffffffff
    return h


def test_version_1_snapshots_still_restore(model, tmp_path):
    """Version 1 is version 2 without the rewind floor (always 0 then)."""
    s = model.session(ctx=64)
    s.eval(IDS)
    s.save(tmp_path / "v2.ds4s")
    blob = (tmp_path / "v2.ds4s").read_bytes()
    floor_at = 8 + 11 * 8 + 2 * 8
    assert blob[4:8] == struct.pack("<I", 2) and blob[floor_at:floor_at + 8] == bytes(8)
    v1 = blob[:4] + struct.pack("<I", 1) + blob[8:floor_at] + blob[floor_at + 8:-8]
    (tmp_path / "v1.ds4s").write_bytes(v1 + struct.pack("<Q", fnv1a64(v1)))
    r = ds4.Session.restore(model, tmp_path / "v1.ds4s", ctx=64)
    assert r.tokens == IDS
    np.testing.assert_array_equal(r.logits, s.logits)
    r.rewind(10)
    s.rewind(10)
    np.testing.assert_array_equal(r.eval(IDS[10:]), s.eval(IDS[10:]))


def test_unknown_snapshot_version_is_refused(model, tmp_path):
    s = model.session(ctx=64)
    s.eval(IDS[:3])
    s.save(tmp_path / "s.ds4s")
    blob = bytearray((tmp_path / "s.ds4s").read_bytes())
    blob[4:8] = struct.pack("<I", 3)
    (tmp_path / "v3.ds4s").write_bytes(bytes(blob))
    with pytest.raises(ds4.Error, match="version 3, this ds4 reads 1 to 2"):
        ds4.Session.restore(model, tmp_path / "v3.ds4s", ctx=64)


def test_warm_reads_every_byte_of_tensor_data_and_reports_progress(tiny_q2):
    import gguf
    data_bytes = tiny_q2.stat().st_size - gguf.GGUFReader(tiny_q2).data_offset
    seen = []
    with ds4.load(tiny_q2, backend="cpu", ctx=64) as m:
        assert m.warm(lambda done, total: seen.append((done, total))) == data_bytes
    assert seen and seen[-1] == (data_bytes, data_bytes)
    assert all(a[0] < b[0] for a, b in zip(seen, seen[1:]))


@pytest.mark.parametrize("numerics", ["exact", "qat-q8"])
def test_greedy_decode_feeds_the_same_tokens_and_logits_as_eval_and_argmax(tiny_q2, numerics):
    with ds4.load(tiny_q2, numerics=numerics) as m:
        a, b = m.session(ctx=64), m.session(ctx=64)
        for s in (a, b):
            s.eval(IDS[:5])
        first = int(np.argmax(a.logits))
        # except the choice eval makes after `first`, so that the exception shows
        probe = m.session(ctx=64)
        probe.eval(IDS[:5])
        banned = greedy_by_eval(probe, first, 1, None)[0]
        got = a.decode_greedy(first, 9, except_id=banned)
        want = greedy_by_eval(b, first, 9, banned)
        assert got == want and banned not in got
        assert a.tokens == b.tokens == IDS[:5] + [first] + want[:-1]
        np.testing.assert_array_equal(a.logits, b.logits)


def test_greedy_decode_refuses_a_full_context_and_keeps_the_state(model):
    s = model.session(ctx=8)
    s.eval(IDS[:6])
    with pytest.raises(ds4.Error, match="context full"):
        s.decode_greedy(5, 3)
    assert s.n_tokens == 6
    with pytest.raises(ValueError, match="token ids"):
        s.decode_greedy(model.config.n_vocab, 1)
    with pytest.raises(ValueError, match="n >= 1"):
        s.decode_greedy(5, 0)
    assert s.tokens == IDS[:6]
