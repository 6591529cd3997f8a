"""Session behaviour that needs no reference model: errors, state bookkeeping, snapshots."""
import os

import numpy as np
import pytest

import ds4


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
    for _ in range(3):
        m = ds4.load(tiny_q2, ctx=256)
        s = m.session()
        s.eval([0, 5, 6])
        m._live = s             # model -> session -> model
        m.__del__()              # as the collector may call it first
        np.testing.assert_array_equal(s.eval([7]), s.logits)
        del m, s
        gc.collect()
