"""The disk KV cache (prompt-and-server.md §5.2-§5.5) on the tiny generated model."""
import errno
import os
import shutil
import struct
import time

import numpy as np
import pytest

import ds4
from ds4.kv_disk import HEADER, DiskKVCache

CTX = 2048


@pytest.fixture(scope="module")
def model(tiny_q2):
    return ds4.load(tiny_q2, ctx=CTX)


@pytest.fixture(scope="module")
def tok(model):
    return model.tokenizer


def filler(n, seed=0, tok=None):
    """n ordinary token ids (no chat markers)."""
    ids = np.random.default_rng(seed).integers(1000, 20000, n)
    if tok is not None:
        assert tok.user_id not in ids and tok.assistant_id not in ids
    return ids.tolist()


@pytest.fixture(scope="module")
def long_ids():
    return filler(700, seed=1)


@pytest.fixture(scope="module")
def reference(model, long_ids):
    """Logits of a plain session after each prefix length the tests use."""
    out = {}
    s = model.session()
    prev = 0
    for n in (64, 100, 128, 200, 256, 300, 512, 600, 700):
        out[n] = s.eval(long_ids[prev:n])
        prev = n
    return out


def small_cache(path, model, log=None, **kw):
    space_mb = kw.pop("space_mb", 64)
    opts = dict(min_tokens=64, cold_max_tokens=0, continued_interval_tokens=0,
                boundary_trim_tokens=8, boundary_align_tokens=128)
    opts.update(kw)
    return DiskKVCache(path, space_mb, model, log=log, **opts)


def session_at(model, ids):
    s = model.session()
    s.eval(ids)
    return s


def kv_files(path):
    return sorted(n for n in os.listdir(path) if n.endswith(".kv"))


# ---- policy on token counts (spec defaults, no model evaluation) ----

def test_cold_save_length_follows_the_spec_examples(model, tmp_path):
    cache = DiskKVCache(tmp_path / "kv", 4096, model)
    ids = lambda n: filler(n, seed=n)
    assert cache.cold_save_length(ids(11011)) == 10240   # trim 32, align down to 2048
    assert cache.cold_save_length(ids(1695)) == 1695     # aligned length < 512: whole prompt
    assert cache.cold_save_length(ids(2080)) == 2048
    assert cache.cold_save_length(ids(2079)) == 2079     # 2047 -> 0 -> whole prompt
    assert cache.cold_save_length(ids(30000)) == 28672
    assert cache.cold_save_length(ids(511)) is None      # below the minimum
    assert cache.cold_save_length(ids(30001)) is None    # above cold max


def test_cold_save_length_prefers_the_chat_anchor(model, tok, tmp_path):
    cache = DiskKVCache(tmp_path / "kv", 4096, model)

    def prompt(user_at, assistant_at, n):
        ids = filler(n, seed=3, tok=tok)
        ids[user_at] = tok.user_id
        ids[assistant_at] = tok.assistant_id
        return ids

    # the last user turn before the first assistant turn, when >= 512 tokens in
    ids = prompt(900, 1000, 5000)
    ids[700] = tok.user_id
    ids[3000] = tok.user_id                  # after the first assistant turn: not the anchor
    assert cache.cold_save_length(ids) == 900
    # a short anchor falls back to trim + align
    assert cache.cold_save_length(prompt(100, 200, 5000)) == 4096


def test_continued_interval_rounds_up_to_the_alignment(model, tmp_path):
    assert DiskKVCache(tmp_path / "a", 4096, model).interval == 10240
    assert DiskKVCache(tmp_path / "b", 4096, model, boundary_align_tokens=0).interval == 10000
    assert DiskKVCache(tmp_path / "c", 4096, model, continued_interval_tokens=0).interval == 0
    cache = DiskKVCache(tmp_path / "d", 4096, model)
    ids = filler(25000)
    # cold: 25000 - 32 aligned down; continued: every 10,240
    assert cache.save_points(ids, 0) == [10240, 20480, 24576]
    # a request that reused 12,000 live tokens is not cold and starts above them
    assert cache.save_points(ids, 12000) == [20480]


def test_cold_max_must_be_zero_or_at_least_min(model, tmp_path):
    with pytest.raises(ds4.Error, match="cold max"):
        DiskKVCache(tmp_path / "kv", 4096, model, cold_max_tokens=100)


def test_directory_is_created_private(model, tmp_path):
    DiskKVCache(tmp_path / "a" / "b", 16, model)
    assert (os.stat(tmp_path / "a" / "b").st_mode & 0o777) == 0o700


# ---- saving and restoring ----

def test_restored_session_matches_the_saved_one_bitwise(model, long_ids, reference, tmp_path):
    cache = small_cache(tmp_path, model)
    live = session_at(model, long_ids[:300])
    entry = cache._save(live, "evict")
    assert entry.n_tokens == 300
    fresh = model.session()
    assert cache.load(cache.lookup(long_ids), fresh) == 300
    assert fresh.tokens == long_ids[:300]
    assert np.array_equal(fresh.logits, reference[300])
    # and the continuation is the same as without the cache
    assert np.array_equal(fresh.eval(long_ids[300:512]), reference[512])


def test_checkpoints_hold_compact_snapshots(model, long_ids, tmp_path):
    from ds4.native import lib
    cache = small_cache(tmp_path, model)
    live = session_at(model, long_ids[:300])
    entry = cache._save(live, "evict")
    compact, full = (lib.ds4_session_snapshot_size(live._s, c) for c in (1, 0))
    assert entry.size == os.path.getsize(entry.path) == HEADER.size + 4 * 300 + compact
    assert compact < full


def test_a_prompt_diverging_inside_a_loaded_checkpoint_gets_the_uncached_answer(
        model, long_ids, reference, tmp_path):
    """A compact checkpoint keeps no rewind rings: going below its length
    replays its tokens, and the logits are those of a session without cache."""
    cache = small_cache(tmp_path, model)
    cache._save(session_at(model, long_ids[:300]), "evict")
    fresh = model.session()
    assert cache.load(cache.lookup(long_ids), fresh) == 300
    other = long_ids[:256] + filler(44, seed=7)
    logits, evaluated = cache.prefill(fresh, other)
    assert evaluated == 44
    assert np.array_equal(logits, session_at(model, other).logits)
    np.testing.assert_array_equal(fresh.eval(long_ids[300:512]), session_at(
        model, other + long_ids[300:512]).logits)


def test_lookup_picks_the_longest_stored_prefix(model, long_ids, tmp_path):
    cache = small_cache(tmp_path, model)
    live = model.session()
    for n in (100, 300, 200):
        live.rewind(0)
        live.eval(long_ids[:n])
        cache._save(live, "evict")
    other = filler(400, seed=9)
    cache._save(session_at(model, other), "evict")
    assert cache.lookup(long_ids).n_tokens == 300
    assert cache.lookup(long_ids[:250]).n_tokens == 200
    assert cache.lookup(long_ids[:100]).n_tokens == 100     # a prompt equal to the entry
    assert cache.lookup(long_ids[:99]) is None
    assert cache.lookup(long_ids[:150] + other).n_tokens == 100
    assert cache.lookup(other + long_ids).n_tokens == 400
    assert cache.lookup(filler(500, seed=10)) is None
    assert small_cache(tmp_path, model, min_tokens=250).lookup(long_ids).n_tokens == 300


def test_lookup_text_matches_the_decoded_prefix_of_a_prompt(model, tok, long_ids, tmp_path):
    cache = small_cache(tmp_path, model)
    for n in (100, 300):
        cache._save(session_at(model, long_ids[:n]), "evict")
    text = tok.decode_bytes(long_ids[:700])
    entry = cache.lookup_text(text)
    assert entry.n_tokens == 300 and text.startswith(entry.text)
    assert cache.lookup_text(tok.decode_bytes(long_ids[:200])).n_tokens == 100
    assert cache.lookup_text(b"something else entirely") is None
    # a str prompt whose tail tokenizes differently across the boundary
    words = "".join(f"line {i}: the quick brown fox\n" for i in range(40))
    cache._save(session_at(model, tok.encode(words)), "evict")
    entry = cache.lookup_text(words + "jumps")
    assert entry is not None and entry.text == words.encode()


def test_prefill_writes_cold_and_continued_checkpoints_at_exact_lengths(
        model, tok, long_ids, reference, tmp_path):
    ids = list(long_ids)
    ids[200], ids[250] = tok.user_id, tok.assistant_id
    log = []
    cache = small_cache(tmp_path, model, log=log.append, cold_max_tokens=1000,
                        continued_interval_tokens=200)     # rounded up to 256
    session = model.session()
    logits, evaluated = cache.prefill(session, ids)
    assert evaluated == 700 and session.tokens == ids
    plain = model.session()
    assert np.array_equal(logits, plain.eval(ids))
    assert sorted((e.n_tokens, e.reason) for e in cache.entries.values()) == [
        (200, 1), (256, 2), (512, 2)]                       # anchor (cold), 256, 512
    for e in cache.entries.values():
        s = model.session()
        assert cache.load(e, s) == e.n_tokens
        assert np.array_equal(s.logits, model.session().eval(ids[:e.n_tokens]))
    # the same prompt again reuses the live state and writes nothing
    before = kv_files(tmp_path)
    assert cache.prefill(session, ids)[1] == 0
    assert kv_files(tmp_path) == before
    assert any("saved 200 tokens (cold" in m for m in log)


def test_a_conversation_survives_a_restart_through_the_cache(model, long_ids, reference,
                                                             tmp_path):
    """Cold request, evict, restart, then a longer prompt: only its new tokens are
    evaluated and the answer is the one without any cache."""
    cache = small_cache(tmp_path, model, cold_max_tokens=1000)
    session = model.session()
    progress = []
    cache.prefill(session, long_ids[:600], progress=lambda done, total: progress.append(done))
    assert progress[-1] == 600
    assert [e.n_tokens for e in cache.entries.values()] == [512]      # 600 - 8, aligned to 128
    cache.before_replace(session)
    assert sorted(e.n_tokens for e in cache.entries.values()) == [512, 600]
    again = small_cache(tmp_path, model, cold_max_tokens=1000)
    fresh = model.session()
    assert again.load(again.lookup(long_ids[:700]), fresh) == 600
    logits, evaluated = again.prefill(fresh, long_ids[:700])
    assert evaluated == 100 and np.array_equal(logits, reference[700])
    assert len(again.entries) == 2                          # reuse of 600: not cold


def test_after_prefill_writes_cold_checkpoint_without_rolling_back(model, long_ids, tmp_path):
    cache = small_cache(tmp_path, model, cold_max_tokens=1000, continued_interval_tokens=0)
    session = session_at(model, long_ids[:600])
    cache.after_prefill(session, long_ids[:600])
    # aligned cold length is 512, but the session is already at 600: saved whole
    assert [e.n_tokens for e in cache.entries.values()] == [600]
    assert session.n_tokens == 600
    # the next request extends the live state: no cold checkpoint
    session.eval(long_ids[600:700])
    cache.after_prefill(session, long_ids[:700])
    assert len(cache.entries) == 1


def test_after_prefill_writes_continued_checkpoint_when_an_interval_is_reached(
        model, long_ids, tmp_path):
    cache = small_cache(tmp_path, model, continued_interval_tokens=256)
    session = session_at(model, long_ids[:200])
    cache.after_prefill(session, long_ids[:200])
    assert not cache.entries
    session.eval(long_ids[200:300])
    cache.after_prefill(session, long_ids[:300])
    assert [e.n_tokens for e in cache.entries.values()] == [300]
    session.eval(long_ids[300:400])
    cache.after_prefill(session, long_ids[:400])            # 256 already behind the frontier
    assert len(cache.entries) == 1


def test_evict_and_shutdown_save_the_live_state_above_the_minimum(model, long_ids, tmp_path):
    cache = small_cache(tmp_path, model)
    cache.before_replace(session_at(model, long_ids[:100]))
    cache.shutdown(session_at(model, long_ids[:128]))
    cache.shutdown(session_at(model, long_ids[:63]))        # below min_tokens: not saved
    assert sorted((e.n_tokens, e.reason) for e in cache.entries.values()) == [(100, 3), (128, 4)]


def test_a_hit_above_cold_max_consumes_the_file(model, long_ids, tmp_path):
    cache = small_cache(tmp_path, model, cold_max_tokens=64)
    cache._save(session_at(model, long_ids[:100]), "evict")
    assert cache.load(cache.lookup(long_ids), model.session()) == 100
    assert kv_files(tmp_path) == [] and cache.lookup(long_ids) is None


# ---- restart, eviction, budget ----

def test_a_restarted_cache_finds_the_files_and_their_hits(model, long_ids, reference, tmp_path):
    cache = small_cache(tmp_path, model)
    cache._save(session_at(model, long_ids[:128]), "shutdown")
    assert cache.load(cache.lookup(long_ids), model.session()) == 128
    stale = tmp_path / (kv_files(tmp_path)[0] + ".tmp.999999999")   # no such process
    stale.write_bytes(b"half a file")
    again = small_cache(tmp_path, model)
    entry = again.lookup(long_ids)
    assert entry.n_tokens == 128 and entry.hits == 1 and entry.reason == 4
    s = model.session()
    assert again.load(entry, s) == 128
    assert np.array_equal(s.logits, reference[128])
    assert not stale.exists()


def test_eviction_keeps_the_directory_under_the_budget_least_recently_used_first(
        model, long_ids, tmp_path):
    probe = small_cache(tmp_path / "probe", model)
    size = probe._save(session_at(model, long_ids[:100]), "evict").size
    log = []
    cache = small_cache(tmp_path / "kv", model, log=log.append, space_mb=2.5 * size / 2**20)
    t = int(time.time())
    saved = {}
    for label, seed, last_used in (("a", 11, t + 10), ("b", 12, t + 5), ("c", 13, t + 20),
                                   ("d", 14, None)):
        # same length, other tokens: equal scores, so the last use decides
        entry = cache._save(session_at(model, filler(100, seed=seed)), "evict")
        if last_used is not None:
            entry.last_used = last_used
        saved[label] = entry.name
        on_disk = sum(os.path.getsize(tmp_path / "kv" / f) for f in kv_files(tmp_path / "kv"))
        assert on_disk <= cache.budget
    # c evicted b (older than a), d then evicted a (older than c)
    assert sorted(cache.entries) == sorted([saved["c"], saved["d"]])
    assert kv_files(tmp_path / "kv") == sorted(cache.entries)
    assert sum(1 for m in log if "evicting" in m) == 2


def test_eviction_prefers_files_with_recent_hits(model, long_ids, tmp_path):
    probe = small_cache(tmp_path / "probe", model)
    size = probe._save(session_at(model, long_ids[:100]), "evict").size
    cache = small_cache(tmp_path / "kv", model, space_mb=2.5 * size / 2**20)
    session = model.session()
    session.eval(long_ids[:100])
    hit = cache._save(session, "evict")
    assert cache.load(hit, model.session()) == 100
    hit.last_used -= 10                                     # older, but used
    for n in (101, 102):
        session.rewind(0)
        session.eval(long_ids[:n])
        cache._save(session, "evict")
    assert hit.name in cache.entries
    assert len(cache.entries) == 2


def test_a_checkpoint_larger_than_the_budget_is_not_written(model, long_ids, tmp_path):
    log = []
    cache = small_cache(tmp_path, model, log=log.append, space_mb=0.1)
    assert cache._save(session_at(model, long_ids[:100]), "evict") is None
    assert kv_files(tmp_path) == [] and "does not fit" in log[-1]


def test_a_full_disk_during_a_save_is_logged_and_serving_goes_on(model, long_ids, reference,
                                                                  tmp_path, monkeypatch):
    log = []
    cache = small_cache(tmp_path, model, log=log.append)
    session = session_at(model, long_ids[:100])
    real_write = os.write
    calls = []

    def full_after_one_write(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_after_one_write)
    assert cache._save(session, "evict") is None
    monkeypatch.setattr(os, "write", real_write)
    assert os.listdir(tmp_path) == []                       # the temporary file is gone
    assert "disk full" in log[-1] and not cache.entries
    assert np.array_equal(session.logits, reference[100])
    assert cache._save(session, "evict").n_tokens == 100


# ---- damaged and foreign files ----

def damage_cases(size, key_len):
    """(name, function bytes -> bytes) over every region of a file of `size` bytes."""
    payload = HEADER.size + key_len
    flip = lambda at: (f"flip@{at}", lambda b: b[:at] + bytes([b[at] ^ 0x40]) + b[at + 1:])
    cases = [flip(at) for at in (0, 3, 4, 7, 8, 16, 24, 40, 48, 52, 59)]          # header
    cases += [flip(at) for at in (HEADER.size, payload - 1)]                     # key
    cases += [flip(at) for at in (payload, payload + 8, payload + 100,          # payload
                                  (payload + size) // 2, size - 9)]
    cases += [flip(at) for at in (size - 8, size - 1)]                           # its checksum
    cases += [(f"cut@{n}", lambda b, n=n: b[:n])
              for n in (0, 10, HEADER.size, payload, payload + 50, size // 2, size - 8, size - 1)]
    cases += [("extra byte", lambda b: b + b"\0")]
    return cases


def test_damaged_files_are_refused_deleted_and_change_nothing(model, long_ids, reference,
                                                              tmp_path):
    good_dir = tmp_path / "good"
    cache = small_cache(good_dir, model)
    entry = cache._save(session_at(model, long_ids[:100]), "evict")
    good = open(entry.path, "rb").read()
    live = session_at(model, long_ids[:64])                  # the state a bad load must not touch
    for label, damage in damage_cases(len(good), 4 * 100):
        d = tmp_path / label.replace("@", "_").replace(" ", "_")
        d.mkdir()
        path = d / entry.name
        # damaged before the cache opens: dropped while scanning, or refused on load
        path.write_bytes(damage(good))
        log = []
        c = small_cache(d, model, log=log.append)
        found = c.lookup(long_ids)
        if found is not None:
            assert c.load(found, live) == 0, label
        assert c.lookup(long_ids) is None, label
        assert not path.exists() and log, label
        assert live.tokens == long_ids[:64] and np.array_equal(live.logits, reference[64]), label
        # damaged after the cache opened it
        path.write_bytes(good)
        c = small_cache(d, model)
        found = c.lookup(long_ids)
        path.write_bytes(damage(good))
        assert c.load(found, live) == 0, label
        assert not path.exists() and c.lookup(long_ids) is None, label
        assert live.tokens == long_ids[:64] and np.array_equal(live.logits, reference[64]), label
    # the intact file still answers
    assert cache.load(cache.lookup(long_ids), live) == 100
    assert np.array_equal(live.logits, reference[100])


def test_a_header_with_hits_rewritten_by_hand_still_loads(model, long_ids, tmp_path):
    cache = small_cache(tmp_path, model)
    entry = cache._save(session_at(model, long_ids[:100]), "evict")
    with open(entry.path, "r+b") as f:          # hits and last-used are outside the checksum
        f.seek(12)
        f.write(struct.pack("<I", 7))
    again = small_cache(tmp_path, model)
    assert again.lookup(long_ids).hits == 7
    assert again.load(again.lookup(long_ids), model.session()) == 100


def test_another_models_files_are_refused(model, tiny_q4, long_ids, tmp_path):
    small_cache(tmp_path, model)._save(session_at(model, long_ids[:100]), "evict")
    (name,) = kv_files(tmp_path)
    other = ds4.load(tiny_q4, ctx=CTX)
    log = []
    cache = small_cache(tmp_path, other, log=log.append)
    assert cache.lookup(long_ids) is None
    assert "another model" in log[-1]
    # even when handed the entry, the load refuses it and the session is untouched
    s = session_at(other, long_ids[:64])
    before = s.logits
    assert cache.load(cache.entries[name], s) == 0
    assert s.n_tokens == 64 and np.array_equal(s.logits, before)


def test_another_numeric_mode_is_refused(tiny_q2, long_ids, model, tmp_path):
    small_cache(tmp_path, model)._save(session_at(model, long_ids[:100]), "evict")
    exact = ds4.load(tiny_q2, ctx=CTX, numerics="exact")
    assert small_cache(tmp_path, exact).lookup(long_ids) is None


def test_foreign_files_go_first_when_space_is_needed(model, tiny_q4, long_ids, tmp_path):
    other = ds4.load(tiny_q4, ctx=CTX)
    theirs = small_cache(tmp_path, other)._save(session_at(other, filler(100, seed=5)), "evict")
    cache = small_cache(tmp_path, model, space_mb=1.5 * theirs.size / 2**20)
    assert theirs.name in cache.entries                      # fits: kept for its owner
    mine = cache._save(session_at(model, long_ids[:100]), "evict")
    assert list(cache.entries) == [mine.name] and kv_files(tmp_path) == [mine.name]


def test_unrelated_files_in_the_directory_are_left_alone(model, long_ids, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    shutil.copy(__file__, tmp_path / "x.kv")
    cache = small_cache(tmp_path, model)
    assert not cache.entries
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "x.kv").exists()


def test_a_file_deleted_behind_the_caches_back_loads_nothing(model, long_ids, tmp_path):
    log = []
    cache = small_cache(tmp_path, model, log=log.append)
    cache._save(session_at(model, long_ids[:100]), "evict")
    entry = cache.lookup(long_ids)
    os.unlink(entry.path)
    assert cache.load(entry, model.session()) == 0
    assert cache.lookup(long_ids) is None and "dropping" in log[-1]


def test_a_session_too_small_or_in_another_mode_loads_nothing_and_keeps_the_file(
        model, long_ids, tmp_path):
    log = []
    cache = small_cache(tmp_path, model, log=log.append)
    entry = cache._save(session_at(model, long_ids[:100]), "evict")
    small = model.session(ctx=64)
    assert cache.load(entry, small) == 0 and small.n_tokens == 0
    assert "ctx 64" in log[-1]
    exact = model.session(numerics="exact")
    assert cache.load(entry, exact) == 0 and exact.n_tokens == 0
    assert os.path.exists(entry.path) and cache.lookup(long_ids) is entry
    assert cache.load(entry, model.session()) == 100


@pytest.mark.parametrize("compact", [False, True])
def test_memory_snapshots_are_the_bytes_of_session_save(model, long_ids, tmp_path, compact):
    from ds4.native import ffi, lib
    s = session_at(model, long_ids[:100])
    s.save(tmp_path / "snap", compact=compact)
    n = lib.ds4_session_snapshot_size(s._s, compact)
    buf = np.empty(n, np.uint8)
    err = ffi.new("char[512]")
    assert lib.ds4_session_snapshot_write(s._s, compact, ffi.from_buffer("char[]", buf), n, err,
                                          512) == 0
    assert buf.tobytes() == (tmp_path / "snap").read_bytes()
    assert lib.ds4_session_snapshot_write(s._s, compact, ffi.from_buffer("char[]", buf), n - 1,
                                          err, 512) == -1
    assert f"needs {n} bytes" in ffi.string(err).decode()
    fresh = model.session()
    assert lib.ds4_session_snapshot_read(fresh._s, ffi.from_buffer("char[]", buf), n - 1, err,
                                         512) == -1
    assert fresh.n_tokens == 0
