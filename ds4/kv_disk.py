"""Disk KV cache: prefix checkpoints of the server's live session that outlive
requests and restarts (prompt-and-server.md §5.2-§5.5).

One file per checkpoint, `<sha1 of the key>.kv`, where the key is the
checkpoint's token ids (u32 little-endian). Layout (little-endian):

| offset | type | field |
|---|---|---|
| 0 | u8[3] | magic `KVC` |
| 3 | u8 | version = 1 |
| 4 | u8 | routed-expert quant bits (2 or 4; 4 iff layer-0 gate experts are Q4_K) |
| 5 | u8 | reason: 1 cold, 2 continued, 3 evict, 4 shutdown |
| 6 | u8 | ext flags = 0 |
| 7 | u8 | numerics: 0 exact, 1 qat, 2 qat-q8 (spec: reserved) |
| 8 | u32 | token count T (> 0) |
| 12 | u32 | hit count (rewritten in place) |
| 16 | u32 | context size of the session that wrote it |
| 20 | u32 | CRC-32 of the header and key, with hits, last-used and this field as 0 (spec: reserved) |
| 24 | u64 | created (Unix s) |
| 32 | u64 | last used (Unix s, rewritten in place) |
| 40 | u64 | payload byte count |
| 48 | u32 | key byte count L = 4·T |
| 52 | u64 | model fingerprint (ds4_model_fingerprint; spec: the key starts here) |
| 60 | L bytes | key: the token ids |
| 60+L | payload | ds4's own compact session snapshot (`DS4S` v2: shape, model fingerprint, ids, logits, the KV that continuing needs; ends with its FNV-1a 64 checksum) |

The payload is ds4's native snapshot, not the DSV4 payload of §5.6, so these
files are readable by this engine only and only with the same model file and
numeric mode. Compact means the window rows and open compressor windows
that the next tokens read, without the rewind rings: a loaded checkpoint
continues cheaply, and rewinding below its length replays its tokens.
"""
import errno
import hashlib
import os
import re
import struct
import time
import weakref
import zlib
from dataclasses import dataclass

import numpy as np

from .errors import Error
from .generation import prefill_step
from .native import ffi, lib

MAGIC = b"KVC"
VERSION = 1
HEADER = struct.Struct("<3sBBBBBIIIIQQQIQ")   # the 60 bytes before the key, as tabled above
HITS_AT, CRC_AT, LAST_USED_AT = 12, 20, 32
REASONS = {"cold": 1, "continued": 2, "evict": 3, "shutdown": 4}
NUMERICS = {"exact": 0, "qat": 1, "qat-q8": 2}
FILE_RE = re.compile(r"^[0-9a-f]{40}\.kv$")
TMP_RE = re.compile(r"^[0-9a-f]{40}\.kv\.tmp\.(\d+)$")
WRITE_CHUNK = 64 << 20
HIT_HALF_LIFE_S = 6 * 3600


class BadFile(Exception):
    """A cache file that is corrupt, truncated or not ours."""


class Unusable(Exception):
    """A sound file that this session cannot take (kept for others)."""


@dataclass
class Entry:
    """One checkpoint on disk: the state after its first `n_tokens` ids."""
    path: str
    ids: np.ndarray          # uint32 [n_tokens]
    size: int                # file bytes
    hits: int
    created: int
    last_used: int
    reason: int
    ctx: int
    numerics: int
    foreign: bool = False    # another model file: never loaded, evicted first
    text: bytes = None       # the decoded tokens, once lookup_text needed them

    @property
    def n_tokens(self):
        return len(self.ids)

    @property
    def name(self):
        return os.path.basename(self.path)


def _key(ids):
    return np.asarray(ids, dtype=np.int64).astype("<u4").tobytes()


def _crc(header, key):
    h = bytearray(header)
    for at, n in ((HITS_AT, 4), (CRC_AT, 4), (LAST_USED_AT, 8)):
        h[at:at + n] = bytes(n)
    return zlib.crc32(key, zlib.crc32(bytes(h)))


def _common_prefix(a, b):
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.nonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))[0]
    return int(diff[0]) if len(diff) else n


def _write_all(fd, data):
    view = memoryview(data).cast("B")
    while len(view):
        done = os.write(fd, view[:WRITE_CHUNK])
        view = view[done:]


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class DiskKVCache:
    """Checkpoints of the live session on disk, found again by token prefix.

    `lookup(ids)` -> the stored entry with the longest prefix of ids (or None;
    `lookup_text(prompt)` matches decoded text instead);
    `load(entry, session)` -> tokens restored (0 when the file was bad: it is then
    logged and deleted); `prefill(session, ids)` replaces ds4.generation.prefill and
    writes the cold and continued checkpoints at their exact lengths;
    `after_prefill(session, ids)` writes them for a caller that prefills itself;
    `before_replace(session)` and `shutdown(session)` write the evict and shutdown
    checkpoints. No method raises for a file or disk problem: it is logged.
    """

    def __init__(self, directory, space_mb, model, log=None, *, min_tokens=512,
                 cold_max_tokens=30000, continued_interval_tokens=10000,
                 boundary_trim_tokens=32, boundary_align_tokens=2048):
        if cold_max_tokens and cold_max_tokens < min_tokens:
            raise Error(f"kv cache: cold max tokens ({cold_max_tokens}) must be 0 or at least "
                        f"the minimum ({min_tokens})")
        if space_mb <= 0:
            raise Error(f"kv cache: space must be positive, got {space_mb} MB")
        self.directory = os.path.abspath(os.fspath(directory))
        self.budget = int(space_mb * 1024 * 1024)
        self.model = model
        self.log = log or (lambda msg: None)
        self.min_tokens = int(min_tokens)
        self.cold_max_tokens = int(cold_max_tokens)
        self.trim = int(boundary_trim_tokens)
        self.align = int(boundary_align_tokens)
        self.interval = self._round_up(int(continued_interval_tokens))
        self.fingerprint = lib.ds4_model_fingerprint(model._handle)
        gate0 = model.config.expert_types[0][0] if model.config.expert_types else ""
        self.quant_bits = 4 if gate0 == "Q4_K" else 2
        self.numerics = NUMERICS[model.numerics]   # the numeric mode lookups serve
        self.entries = {}        # file name -> Entry
        self._live = None        # weakref to the session the tracking below is about
        self._live_tokens = []   # its tokens when a hook last saw it
        self._frontier = 0       # longest checkpoint of its token lineage (saved or loaded)
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise Error(f"kv cache: cannot create {self.directory}: {exc.strerror}") from None
        self._scan()
        self._evict()

    # ---- policy (token counts only) ----

    def _round_up(self, n):
        if n <= 0:
            return 0
        return -(-n // self.align) * self.align if self.align else n

    def cold_save_length(self, ids):
        """Tokens of the cold checkpoint of a prompt (§5.3), or None when a cold
        prompt of this length is not saved: the chat anchor (the last user turn
        before the first assistant turn) when it is long enough, else the prompt
        less the trim, aligned down, else the whole prompt."""
        n = len(ids)
        if not self.cold_max_tokens or n < self.min_tokens or n > self.cold_max_tokens:
            return None
        anchor = self._chat_anchor(ids)
        if anchor is not None and anchor >= self.min_tokens:
            return anchor
        cut = n - self.trim
        if self.align:
            cut = cut // self.align * self.align
        return cut if cut >= self.min_tokens else n

    def _chat_anchor(self, ids):
        try:
            tok = self.model.tokenizer
            user, assistant = tok.user_id, tok.assistant_id
        except Error:
            return None
        arr = np.asarray(ids, dtype=np.int64)
        first_asst = np.nonzero(arr == assistant)[0]
        head = arr[:first_asst[0]] if len(first_asst) else arr[:0]
        users = np.nonzero(head == user)[0]
        return int(users[-1]) if len(users) else None

    def save_points(self, ids, reused):
        """Lengths at which a prefill of `ids` that kept `reused` tokens pauses to
        write a checkpoint: the cold one (when fewer than min_tokens were reused)
        and every continued interval above the last saved frontier."""
        points = set()
        if reused < self.min_tokens:
            cold = self.cold_save_length(ids)
            if cold is not None and cold > reused:
                points.add(cold)
        if self.interval:
            floor = max(reused, self._frontier)
            k = floor // self.interval + 1
            while k * self.interval <= len(ids):
                points.add(k * self.interval)
                k += 1
        return sorted(points)

    # ---- server hooks ----

    def lookup(self, ids):
        """The entry holding the longest prefix of `ids` (at least min_tokens), or None."""
        ids = np.asarray(ids, dtype=np.int64)
        best = None
        for e in self.entries.values():
            n = e.n_tokens
            if e.foreign or e.numerics != self.numerics or n < self.min_tokens or n > len(ids):
                continue
            if best is not None and n <= best.n_tokens:
                continue   # an equal length with the same prefix would be the same file
            if np.array_equal(e.ids, ids[:n]):
                best = e
        return best

    def lookup_text(self, prompt):
        """The entry whose tokens decode to the longest byte prefix of a rendered
        prompt (str or bytes), tie -> more tokens: the spec's `disk-text` match, for
        prompts whose tokenization differs from the stored tokens. The caller goes
        on with the entry's tokens + the tokenized rest, prompt[len(entry.text):]."""
        data = prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt)
        tok = self.model.tokenizer
        best = None
        for e in self.entries.values():
            if e.foreign or e.numerics != self.numerics or e.n_tokens < self.min_tokens:
                continue
            if e.text is None:
                e.text = tok.decode_bytes(e.ids.tolist())
            if len(e.text) <= len(data) and data.startswith(e.text) and (
                    best is None or (len(e.text), e.n_tokens) > (len(best.text), best.n_tokens)):
                best = e
        return best

    def load(self, entry, session):
        """Restores `entry` into `session`; returns the tokens restored, or 0 after
        logging and deleting a bad file (the session is then as before, or empty)."""
        try:
            self._restore(entry, session)
        except Unusable as exc:
            self.log(f"kv cache: not loading {entry.name}: {exc}")
            return 0
        except (BadFile, Error, OSError, ValueError) as exc:
            self.log(f"kv cache: dropping {entry.name}: {exc}")
            self._delete(entry.name)
            return 0
        n = entry.n_tokens
        now = int(time.time())
        entry.hits += 1
        entry.last_used = now
        self._track(session, n)
        if self.cold_max_tokens and n > self.cold_max_tokens:
            # consumed: the live session is saved again on evict or shutdown
            self._delete(entry.name)
        else:
            self._touch(entry)
        self.log(f"kv cache: loaded {n} tokens from {entry.name}")
        return n

    def prefill(self, session, ids, progress=None):
        """ds4.generation.prefill that pauses at this cache's save points to write
        checkpoints. Returns (logits after the last id, tokens evaluated)."""
        ids = [int(t) for t in ids]
        keep = _common_prefix(session.tokens, ids)
        if keep == len(ids) == session.n_tokens and session.logits is not None:
            self._start_request(session, keep)
            self._live_tokens = ids
            return session.logits, 0
        keep = min(keep, len(ids) - 1)         # the last id is evaluated for its logits
        session.rewind(keep)
        self._start_request(session, keep)
        points = self.save_points(ids, keep)
        cold = self.cold_save_length(ids) if keep < self.min_tokens else None
        pos, logits, step = keep, None, prefill_step(session)
        for stop in points + [len(ids)]:
            while pos < stop:
                end = min(pos + step, stop)
                logits = session.eval(ids[pos:end])
                pos = end
                if progress:
                    progress(pos - keep, len(ids) - keep)
            if stop in points:
                self._save(session, "cold" if stop == cold else "continued")
        self._live_tokens = ids
        return logits, len(ids) - keep

    def after_prefill(self, session, ids):
        """For a caller that prefilled `ids` (or a prefix of them) itself. Writes the
        cold checkpoint when the request reused less than min_tokens, and a
        continued one when a continued interval was reached above the last saved
        frontier. It cannot roll back: when the session already went past the exact
        length, the checkpoint holds the whole live state instead (use `prefill`
        for the exact lengths)."""
        ids = [int(t) for t in ids]
        n = session.n_tokens
        reused = self._reused(session, ids)
        self._start_request(session, reused)
        reason = None
        cold = self.cold_save_length(ids) if reused < self.min_tokens else None
        if cold is not None and reused < cold <= n:
            reason = "cold"
        elif self.interval and n // self.interval * self.interval > max(self._frontier, reused):
            reason = "continued"
        if reason:
            self._save(session, reason)
        self._live_tokens = session.tokens

    def before_replace(self, session):
        """The live session is about to be discarded: write it (`evict`)."""
        self._save(session, "evict")
        self._live = None

    def shutdown(self, session):
        """The server is stopping: write the live session (`shutdown`)."""
        self._save(session, "shutdown")

    @property
    def total_bytes(self):
        return sum(e.size for e in self.entries.values())

    # ---- tracking of the live session ----

    def _reused(self, session, ids):
        if self._live is None or self._live() is not session:
            return 0
        return _common_prefix(self._live_tokens, ids)

    def _start_request(self, session, reused):
        if self._live is None or self._live() is not session or reused < self._frontier:
            self._frontier = 0
        self._live = weakref.ref(session)

    def _track(self, session, frontier):
        self._live = weakref.ref(session)
        self._live_tokens = session.tokens
        self._frontier = frontier

    # ---- files ----

    def _path(self, name):
        return os.path.join(self.directory, name)

    def _read_entry(self, path, f):
        """Parses and checks the header and key of an open cache file."""
        raw = f.read(HEADER.size)
        if len(raw) < HEADER.size:
            raise BadFile("truncated header")
        (magic, version, _quant, reason, _flags, numerics, n, hits, ctx, crc, created, last_used,
         payload, key_len, fingerprint) = HEADER.unpack(raw)
        if magic != MAGIC:
            raise BadFile("not a KVC file")
        if version != VERSION:
            raise BadFile(f"KVC version {version}, this ds4 reads {VERSION}")
        if n == 0 or key_len != 4 * n:
            raise BadFile("inconsistent token count")
        key = f.read(key_len)
        if len(key) != key_len:
            raise BadFile("truncated key")
        if _crc(raw, key) != crc:
            raise BadFile("header checksum mismatch")
        if hashlib.sha1(key).hexdigest() + ".kv" != os.path.basename(path):
            raise BadFile("file name does not match its key")
        size = os.fstat(f.fileno()).st_size
        if size != HEADER.size + key_len + payload:
            raise BadFile(f"{size} bytes, the header says {HEADER.size + key_len + payload}")
        return Entry(path, np.frombuffer(key, dtype="<u4").copy(), size, hits, created,
                     last_used, reason, ctx, numerics, fingerprint != self.fingerprint), payload

    def _scan(self):
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as exc:
            raise Error(f"kv cache: cannot read {self.directory}: {exc.strerror}") from None
        for name in names:
            path = self._path(name)
            tmp = TMP_RE.match(name)
            if tmp:
                # a save cut short by a crash; a live process may still be writing it
                if int(tmp.group(1)) != os.getpid() and not _pid_alive(int(tmp.group(1))):
                    self._unlink(path)
                continue
            if not FILE_RE.match(name):
                continue
            try:
                with open(path, "rb") as f:
                    entry = self._read_entry(path, f)[0]
            except (BadFile, OSError) as exc:
                self.log(f"kv cache: dropping {name}: {exc}")
                self._unlink(path)
                continue
            if entry.foreign:
                self.log(f"kv cache: {name} was written with another model file; ignored "
                         "(evicted first)")
            self.entries[name] = entry

    def _restore(self, entry, session):
        with open(entry.path, "rb") as f:
            found, payload = self._read_entry(entry.path, f)
            if not np.array_equal(found.ids, entry.ids):
                raise BadFile("its tokens changed")
            if found.foreign:
                raise BadFile("written with another model file")
            if found.numerics != NUMERICS[session.numerics]:
                raise Unusable(f"the session uses {session.numerics} numerics")
            if found.n_tokens > session.ctx:
                raise Unusable(f"{found.n_tokens} tokens exceed the session's ctx {session.ctx}")
            buf = np.empty(payload, dtype=np.uint8)
            if f.readinto(memoryview(buf)) != payload:
                raise BadFile("truncated payload")
        err = ffi.new("char[512]")
        if lib.ds4_session_snapshot_read(session._s, ffi.from_buffer("char[]", buf), payload,
                                         err, len(err)) != 0:
            raise BadFile(ffi.string(err).decode("utf-8", "replace"))
        if session.n_tokens != entry.n_tokens or not np.array_equal(session.tokens, entry.ids):
            session.rewind(0)
            raise BadFile("restored tokens differ from the key")

    def _touch(self, entry):
        try:
            fd = os.open(entry.path, os.O_WRONLY)
            try:
                os.pwrite(fd, struct.pack("<I", entry.hits), HITS_AT)
                os.pwrite(fd, struct.pack("<Q", entry.last_used), LAST_USED_AT)
            finally:
                os.close(fd)
        except OSError as exc:
            self.log(f"kv cache: cannot update {entry.name}: {exc.strerror}")

    def _save(self, session, reason):
        """Writes the session's state as a checkpoint; returns the Entry or None."""
        n = session.n_tokens
        if n < self.min_tokens:
            return None
        if self._live is not None and self._live() is session:
            self._frontier = max(self._frontier, n)
        ids = session.tokens
        key = _key(ids)
        name = hashlib.sha1(key).hexdigest() + ".kv"
        path = self._path(name)
        if name in self.entries and not self.entries[name].foreign and os.path.exists(path):
            return self.entries[name]
        payload = lib.ds4_session_snapshot_size(session._s, 1)
        size = HEADER.size + len(key) + payload
        if size * 1.01 > self.budget:
            self.log(f"kv cache: {n}-token checkpoint ({size >> 20} MiB) does not fit the "
                     f"{self.budget >> 20} MiB budget; not saved")
            return None
        self._evict(room=size)
        t0 = time.monotonic()
        try:
            buf = np.empty(payload, dtype=np.uint8)
        except MemoryError:
            self.log(f"kv cache: no memory for a {payload >> 20} MiB snapshot; not saved")
            return None
        err = ffi.new("char[512]")
        if lib.ds4_session_snapshot_write(session._s, 1, ffi.from_buffer("char[]", buf),
                                          payload, err, len(err)) != 0:
            self.log(f"kv cache: no checkpoint: {ffi.string(err).decode('utf-8', 'replace')}")
            return None
        now = int(time.time())
        header = HEADER.pack(MAGIC, VERSION, self.quant_bits, REASONS[reason], 0,
                             NUMERICS[session.numerics], n, 0, session.ctx, 0, now, now,
                             payload, len(key), self.fingerprint)
        crc = _crc(header, key)
        header = header[:CRC_AT] + struct.pack("<I", crc) + header[CRC_AT + 4:]
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, header + key)
                _write_all(fd, buf)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as exc:
            self._unlink(tmp)
            why = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            self.log(f"kv cache: cannot write a {n}-token checkpoint: {why}; not saved")
            return None
        _fsync_dir(self.directory)
        entry = Entry(path, np.frombuffer(key, "<u4").copy(), size, 0, now, now, REASONS[reason],
                      session.ctx, NUMERICS[session.numerics])
        self.entries[name] = entry
        self.log(f"kv cache: saved {n} tokens ({reason}, {size / 2**20:.1f} MiB, "
                 f"{time.monotonic() - t0:.2f} s) as {name}")
        self._evict(protect=name)
        return entry

    def _score(self, e, now):
        if e.foreign:
            return -1.0
        age = max(0, now - e.last_used)
        hits = e.hits * 2.0 ** (-age / HIT_HALF_LIFE_S)
        if hits < 0.01:
            hits = 0.0
        return (hits + 1.0) * e.n_tokens / e.size

    def _evict(self, room=0, protect=None):
        """Deletes the lowest-scoring files until they and `room` more bytes fit."""
        now = int(time.time())
        while self.entries and self.total_bytes + room > self.budget:
            victims = [e for e in self.entries.values() if e.name != protect]
            if not victims:
                return
            victim = min(victims, key=lambda e: (self._score(e, now), e.last_used))
            self.log(f"kv cache: evicting {victim.name} ({victim.n_tokens} tokens)")
            self._delete(victim.name)

    def _delete(self, name):
        self.entries.pop(name, None)
        self._unlink(self._path(name))

    def _unlink(self, path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.log(f"kv cache: cannot delete {path}: {exc.strerror}")


__all__ = ["DiskKVCache", "Entry"]
