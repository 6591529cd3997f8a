"""A local stand-in for the Hugging Face Hub, enough for `ds4 download`.

It answers like the real Hub does for an LFS file:
  HEAD/GET /{repo}/resolve/{revision}/{file}  -> 302 to a CDN URL on another origin, with
      X-Repo-Commit, X-Linked-Etag (the sha256), X-Linked-Size; 401/404 with X-Error-Code.
  GET /cdn/{sha256}                           -> the bytes, honouring `Range: bytes=N-` (206).
The CDN is addressed as http://localhost:PORT while the Hub is http://127.0.0.1:PORT, so the
two are different origins, as huggingface.co and its CDN are.

Every request is logged (method, path, Range, Authorization, bytes sent), and a test can make
the next CDN body break after N bytes (`drop_after`), stall after N bytes (`stall_after`)
until `release()`, or have Range requests ignored (`ignore_range`).
"""
import hashlib
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO = "antirez/deepseek-v4-gguf"
COMMIT = "5f0c4a1e9b2d7c3f8a6e1d0b4c9f2a7e3d8b1c6f"


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    auth: str | None
    sent: int = 0       # body bytes written to the client


class FakeHub:
    def __init__(self, files, token=None):
        self.files = dict(files)            # name -> bytes
        self.token = token                  # when set, /resolve needs "Bearer <token>"
        self.announced_size = {}            # name -> size to announce instead of the real one
        self.announced_sha = {}             # name -> sha256 to announce instead of the real one
        self.drop_after = None              # cut the next CDN body after this many bytes
        self.stall_after = None             # hold CDN bodies after this many bytes
        self.ignore_range = False           # answer Range requests with the whole file (200)
        self.stalled = threading.Event()    # set once a body is held
        self.requests = []
        self._release = threading.Event()
        self._lock = threading.Lock()

    def __enter__(self):
        hub = self

        class Handler(_Handler):
            pass
        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{port}"
        self.cdn_url = f"http://localhost:{port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def release(self):
        """Let stalled bodies finish (their clients may be gone by then)."""
        self.stall_after = None
        self._release.set()

    def cdn_gets(self):
        return [r for r in self.requests if r.method == "GET" and r.path.startswith("/cdn/")]

    def sha256(self, name):
        return self.announced_sha.get(name) or hashlib.sha256(self.files[name]).hexdigest()

    def _log(self, request):
        with self._lock:
            self.requests.append(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub = None

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._route(body=False)

    def do_GET(self):
        self._route(body=True)

    def _route(self, body):
        hub = self.hub
        req = Request(self.command, self.path, self.headers.get("Range"),
                      self.headers.get("Authorization"))
        hub._log(req)
        m = re.fullmatch(r"/(.+?/.+?)/resolve/([^/]+)/(.+)", self.path)
        if m:
            return self._resolve(*m.groups())
        m = re.fullmatch(r"/cdn/([0-9a-f]{64})", self.path)
        if m:
            return self._cdn(m.group(1), req, body)
        self._reply(404)

    def _resolve(self, repo, revision, name):
        hub = self.hub
        auth = self.headers.get("Authorization")
        if hub.token and auth != f"Bearer {hub.token}":
            if auth is None:
                return self._reply(401, {"X-Error-Code": "RepoNotFound",
                                         "X-Error-Message": "Repository not found"})
            return self._reply(401, {"X-Error-Message":
                                     "Invalid credentials in Authorization header"})
        if repo != REPO:
            return self._reply(404, {"X-Error-Code": "RepoNotFound"})
        if revision not in ("main", COMMIT):
            return self._reply(404, {"X-Error-Code": "RevisionNotFound"})
        if name not in hub.files:
            return self._reply(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        sha = hub.sha256(name)
        size = hub.announced_size.get(name, len(hub.files[name]))
        self._reply(302, {"Location": f"{hub.cdn_url}/cdn/{sha}", "X-Repo-Commit": COMMIT,
                          "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(size),
                          "ETag": '"0a1b2c3d4e5f"'})

    def _cdn(self, sha, req, body):
        hub = self.hub
        data = next((d for n, d in hub.files.items() if hub.sha256(n) == sha), None)
        if data is None:
            return self._reply(404)
        start = 0
        ranged = req.range is not None and not hub.ignore_range
        if ranged:
            start = int(re.fullmatch(r"bytes=(\d+)-", req.range).group(1))
            if start >= len(data):
                return self._reply(416, {"Content-Range": f"bytes */{len(data)}"})
        headers = {"Accept-Ranges": "bytes", "Content-Length": str(len(data) - start)}
        if ranged:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self.send_response(206 if ranged else 200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self._send_body(data[start:], req)

    def _send_body(self, payload, req):
        hub = self.hub
        cut, hub.drop_after = hub.drop_after, None
        hold = hub.stall_after
        try:
            if cut is not None:
                self._write(payload[:cut], req)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # the body breaks off mid-way
                return
            if hold is not None:
                self._write(payload[:hold], req)
                hub.stalled.set()
                hub._release.wait(60)
                payload = payload[hold:]
            self._write(payload, req)
        except OSError:  # the client went away (killed mid-transfer)
            self.close_connection = True

    def _write(self, data, req):
        self.wfile.write(data)
        self.wfile.flush()
        req.sent += len(data)

    def _reply(self, status, headers=None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()
