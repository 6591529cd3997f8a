"""Fetch the published DeepSeek V4 Flash GGUF files from the Hugging Face Hub.

huggingface_hub resolves the file (URL pinned to a commit, size, LFS sha256, token, Hub errors)
and provides the HTTP session. The transfer itself is done here because hf_hub_download keeps
nothing between runs: it writes to a per-process temporary file and deletes it on failure, and an
80 GiB download must survive a dropped connection, a reboot or Ctrl+C. The bytes go to
FILE.part, which a later run continues with a Range request; the finished file is checked for size
and sha256, then renamed into place.
"""
import errno
import hashlib
import importlib
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import Error
from .paths import KNOWN_FILES, models_dir

REPO = "antirez/deepseek-v4-gguf"
REVISION = "main"
MTP_FILE = "DeepSeek-V4-Flash-MTP-Q4K-Q8_0-F32.gguf"

# Target names and files as antirez/ds4's download_model.sh publishes them
# (paths.KNOWN_FILES order: q2-imatrix, q2, q4-imatrix, q4).
TARGETS = {
    "q2-imatrix": (KNOWN_FILES[0], "2-bit experts, imatrix: for 96/128 GB RAM, about 81 GB"),
    "q4-imatrix": (KNOWN_FILES[2], "4-bit experts, imatrix: for 256 GB RAM or more, about 153 GB"),
    "q2": (KNOWN_FILES[1], "legacy 2-bit experts, about 81 GB"),
    "q4": (KNOWN_FILES[3], "legacy 4-bit experts, about 153 GB"),
    "mtp": (MTP_FILE, "optional MTP speculative-decoding component, about 3.8 GB"),
}
DEFAULT_TARGET = "q2-imatrix"

RETRIES = 5            # failed attempts in a row, without new bytes, before giving up
MAX_BACKOFF_S = 8
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Remote:
    filename: str
    url: str            # the resolve URL, pinned to the commit the Hub reported
    size: int
    sha256: str | None  # the LFS object id; None for a plain git file


@dataclass
class Result:
    path: str
    fetched: int        # bytes transferred by this run (0: the file was already complete)
    resumed_from: int   # bytes of a previous partial download that were kept


class _Transient(Exception):
    """A failure worth retrying: the connection broke, or the server said 'later'."""


def target_path(target, directory=None):
    return os.path.join(_directory(directory), TARGETS[target][0])


def partial_path(path):
    return path + ".part"  # not *.gguf, so a partial file is never taken for a model


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def download(target, directory=None, token=None, endpoint=None, progress=True, note=None):
    """Download `target` (a TARGETS key) into `directory` (default: ds4.paths.models_dir()).

    token: a Hugging Face token; None uses $HF_TOKEN or the saved `hf auth login` token.
    endpoint: the Hub URL; None uses $HF_ENDPOINT (read when huggingface_hub is imported).
    note: called with one-line progress messages (resuming, discarding a stale partial file).
    Returns a Result. Raises ds4.Error with a one-line message; KeyboardInterrupt leaves
    the partial file in place for the next run.
    """
    from huggingface_hub.utils import build_hf_headers

    note = note or (lambda msg: None)
    path = target_path(target, directory)
    part = partial_path(path)
    headers = build_hf_headers(token=token, library_name="ds4")
    token_sent = "authorization" in headers
    remote = _resolve(TARGETS[target][0], token, token_sent, endpoint)

    if os.path.isfile(path):
        have = os.path.getsize(path)
        if have == remote.size:
            return Result(path, 0, 0)
        raise Error(f"{path} already exists with {have:,} bytes, but the Hub's file has "
                    f"{remote.size:,}: move it away and run again")
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    if have > remote.size:
        note(f"discarding {part}: it is larger than the file on the Hub")
        os.remove(part)
        have = 0
    _check_space(os.path.dirname(path), remote, have)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if have:
        note(f"resuming {remote.filename} at {human(have)} of {human(remote.size)}")

    try:
        with open(part, "ab") as f:
            _lock(f, part)
            sha = _hash_prefix(part, f.tell(), progress) if remote.sha256 else None
            with _progress_bar(total=remote.size, initial=f.tell(), desc=target,
                               disable=not progress) as bar:
                sink = _Sink(f, sha, bar, note)
                _fill(sink, remote, headers, token_sent)
    except OSError as exc:  # writing the partial file (Hub errors are turned into Error earlier)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise Error(f"disk full while writing {part} ({human(os.path.getsize(part))} of "
                        f"{human(remote.size)} kept): free some space and run the same command "
                        f"again to resume") from None
        raise Error(f"cannot write {part}: {exc.strerror or exc}") from None

    got = os.path.getsize(part)
    if got != remote.size:
        raise Error(f"{part} has {got:,} bytes after the download, but the Hub announced "
                    f"{remote.size:,}: run the same command again")
    if sink.sha is not None and sink.sha.hexdigest() != remote.sha256:
        os.remove(part)  # no byte of it can be trusted, and resuming would keep the bad ones
        raise Error(f"{remote.filename} failed its sha256 check (expected {remote.sha256}, "
                    f"got {sink.sha.hexdigest()}); the download was deleted: run the same "
                    f"command again")
    os.replace(part, path)
    return Result(path, sink.fetched, sink.kept)


def _directory(directory):
    return os.path.abspath(os.path.expanduser(os.fspath(directory))) if directory else models_dir()


def _resolve(filename, token, token_sent, endpoint):
    """Size, sha256 and commit-pinned URL of `filename`, from the Hub's HEAD /resolve answer."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(REPO, filename, revision=REVISION, endpoint=endpoint)
    with _hub_errors(filename, token_sent, url):
        meta = get_hf_file_metadata(url, token=token, library_name="ds4")
    if meta.size is None:
        raise Error(f"the Hub did not report the size of {filename} ({url})")
    etag = meta.etag or ""
    if meta.commit_hash:
        url = hf_hub_url(REPO, filename, revision=meta.commit_hash, endpoint=endpoint)
    return Remote(filename, url, meta.size, etag if SHA256.fullmatch(etag) else None)


@contextmanager
def _hub_errors(filename, token_sent, url):
    """Hub and network failures as one line each."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        yield
    except HfHubHTTPError as exc:
        repo_missing = isinstance(exc, RepositoryNotFoundError)
        raise Error(_status_message(exc.response.status_code, filename, token_sent,
                                    repo_missing)) from None
    except OfflineModeIsEnabled:
        raise Error("HF_HUB_OFFLINE is set: unset it to download") from None
    except _http_library().HTTPError as exc:
        raise Error(f"cannot reach the Hugging Face Hub at {url}: {_first_line(exc)}") from None


def _http_library():
    """httpx (huggingface_hub 1.x) or httpx2 (2.x): the module whose errors the session raises."""
    from huggingface_hub import get_session
    return importlib.import_module(type(get_session()).__module__.partition(".")[0])


def _status_message(status, filename, token_sent, repo_missing=False):
    if status == 401:
        if token_sent:
            return (f"the Hugging Face Hub rejected the token for {REPO} (HTTP 401): "
                    f"check --token or HF_TOKEN")
        return f"{REPO} needs a Hugging Face token (HTTP 401): pass --token or set HF_TOKEN"
    if status == 403:
        return (f"access to {REPO} is forbidden (HTTP 403): check that the token may read it "
                f"and that the repository's terms are accepted")
    if status == 404:
        if repo_missing:
            return f"repository {REPO} not found on the Hub (HTTP 404)"
        return f"{filename} not found in {REPO} (HTTP 404)"
    return f"the Hugging Face Hub answered HTTP {status} for {filename}: try again later"


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_space(directory, remote, have):
    """Refuse before the first byte when the rest of the file cannot fit."""
    probe = directory
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)  # the directory may not exist yet: ask its filesystem
    needed = remote.size - have
    free = shutil.disk_usage(probe).free
    if free < needed:
        kept = f", {human(have)} already downloaded" if have else ""
        raise Error(f"not enough disk space in {directory}: {remote.filename} needs "
                    f"{human(needed)} more ({human(remote.size)} in all{kept}) but only "
                    f"{human(free)} is free")


def _lock(f, part):
    """Two runs appending to one partial file would interleave their bytes."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the sha256 check still catches a mix-up
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise Error(f"another download is writing {part}") from None


def _progress_bar(**kwargs):
    from huggingface_hub.utils import tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS
    return tqdm(unit="B", unit_scale=True, unit_divisor=1024, **kwargs)


def _hash_prefix(part, nbytes, progress):
    """sha256 state after the first `nbytes` of the partial file, so new bytes hash as they come."""
    sha = hashlib.sha256()
    if not nbytes:
        return sha
    with open(part, "rb") as f, _progress_bar(total=nbytes, desc="checking partial file",
                                               disable=not progress) as bar:
        left = nbytes
        while left and (chunk := f.read(min(16 << 20, left))):
            sha.update(chunk)
            bar.update(len(chunk))
            left -= len(chunk)
    return sha


class _Sink:
    """The partial file, its running sha256 and the progress bar, kept in step."""

    def __init__(self, f, sha, bar, note):
        self.f, self.sha, self.bar, self._note = f, sha, bar, note
        self.kept = f.tell()
        self.fetched = 0

    def tell(self):
        return self.f.tell()

    def write(self, chunk):
        self.f.write(chunk)
        if self.sha is not None:
            self.sha.update(chunk)
        self.bar.update(len(chunk))
        self.fetched += len(chunk)

    def note(self, msg):
        with self.bar.external_write_mode(file=sys.stderr):  # not through the bar's line
            self._note(msg)

    def restart(self):
        """The server ignored the Range header and sends the whole file again."""
        self.f.seek(0)
        self.f.truncate()
        if self.sha is not None:
            self.sha = hashlib.sha256()
        self.bar.reset(total=self.bar.total)
        self.kept = 0


def _fill(sink, remote, headers, token_sent):
    """Append the rest of the file, resuming after broken connections."""
    http = _http_library()
    failures = 0
    while sink.tell() < remote.size:
        start = sink.tell()
        try:
            _fetch_from(sink, remote, headers, token_sent)
        except (_Transient, http.TransportError) as exc:
            failures = 1 if sink.tell() > start else failures + 1
            if failures > RETRIES:
                raise Error(f"download of {remote.filename} stopped at {human(sink.tell())} of "
                            f"{human(remote.size)} ({_first_line(exc)}): run the same command "
                            f"again to resume") from None
            wait = min(2 ** (failures - 1), MAX_BACKOFF_S)
            sink.note(f"transfer broke at {human(sink.tell())} ({_first_line(exc)}): "
                      f"retrying in {wait} s")
            time.sleep(wait)
            continue
        except http.HTTPError as exc:
            raise Error(f"download of {remote.filename} failed: {_first_line(exc)}") from None
        if sink.tell() < remote.size:
            raise Error(f"{remote.filename}: the Hub announced {remote.size:,} bytes but the "
                        f"transfer ended at {sink.tell():,}")


def _fetch_from(sink, remote, headers, token_sent):
    """One GET from the current end of the partial file to the end (or until it breaks)."""
    from huggingface_hub import constants, get_session

    start = sink.tell()
    request_headers = dict(headers, **{"Accept-Encoding": "identity"})  # ranges of the raw bytes
    if start:
        request_headers["Range"] = f"bytes={start}-"
    # The session follows the redirect to the CDN and drops the token when it leaves the Hub's host.
    with get_session().stream("GET", remote.url, headers=request_headers,
                              timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
        if r.status_code in (408, 429) or r.status_code >= 500:
            raise _Transient(f"HTTP {r.status_code}")
        if r.status_code >= 400:
            raise Error(_status_message(r.status_code, remote.filename, token_sent))
        if r.status_code == 206:
            first, total = _content_range(r.headers.get("Content-Range"))
            if first != start:
                raise Error(f"{remote.filename}: asked the Hub for bytes from {start:,} "
                            f"and got bytes from {first:,}")
        elif r.status_code == 200:
            total = r.headers.get("Content-Length")
            total = int(total) if total is not None else None
        else:
            raise Error(f"{remote.filename}: unexpected answer HTTP {r.status_code} from {r.url}")
        if total is not None and total != remote.size:
            raise Error(f"{remote.filename}: the Hub announced {remote.size:,} bytes but serves "
                        f"{total:,}")
        if start and r.status_code == 200:
            sink.note("the server cannot resume (it ignored the Range request): starting over")
            sink.restart()
        for chunk in r.iter_bytes():
            if sink.tell() + len(chunk) > remote.size:
                raise Error(f"{remote.filename}: the Hub sent more than the {remote.size:,} bytes "
                            f"it announced")
            sink.write(chunk)


def _content_range(value):
    """'bytes FIRST-LAST/TOTAL' -> (FIRST, TOTAL or None)."""
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    if not m:
        raise Error(f"the Hub answered a resume request with a bad Content-Range: {value!r}")
    return int(m.group(1)), None if m.group(2) == "*" else int(m.group(2))

