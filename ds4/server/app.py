"""The aiohttp application: routes, auth, CORS, body limit and JSON errors.

Errors reach clients as JSON in their API family's shape: Anthropic's
``{"type":"error","error":{"type","message"}}`` on ``/v1/messages``,
OpenAI's ``{"error":{"message","type"}}`` everywhere else.
"""
from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from ..dsml import ToolReplayMemory
from . import anthropic, openai_chat, openai_completions, responses
from . import requests as rq
from .engine import MODEL_ID
from .worker import Worker

log = logging.getLogger("ds4.server")

SERVER_KEY = web.AppKey("ds4_server", object)
MODEL_CREATED = 1767225600
_ANTHROPIC_KINDS = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


# Handler cancellation: a client that disconnects cancels its request at once.
# Header limits as ds4's (64 KiB) rather than aiohttp's 8 KiB.
_RUN_OPTIONS = dict(handler_cancellation=True, access_log=None, max_line_size=65536,
                    max_field_size=65536)


class LockedReplay:
    """The replay memory, shared by request threads and the event loop."""

    def __init__(self, max_ids):
        self._memory = ToolReplayMemory(max_ids=max_ids)
        self._lock = threading.Lock()

    def block_for(self, ids):
        with self._lock:
            return self._memory.block_for(ids)

    def remember(self, message):
        with self._lock:
            self._memory.remember(message)

    def __contains__(self, call_id):
        with self._lock:
            return call_id in self._memory

    def __len__(self):
        with self._lock:
            return len(self._memory)


class Server:
    """Everything one ``ds4 serve`` process shares: engine, worker, replay memory."""

    def __init__(self, engine, *, max_queue=16, kv_cache=None, api_key=None, cors=False,
                 keepalive=5.0, max_body_mb=64, tool_memory_max_ids=100_000, trace=None):
        self.engine = engine
        self.ctx = engine.ctx
        self.worker = Worker(engine, max_queue=max_queue, kv_cache=kv_cache, trace=trace)
        self.replay = LockedReplay(tool_memory_max_ids)
        self.api_key = api_key
        self.cors = cors
        self.keepalive = keepalive
        self.max_body = int(max_body_mb * (1 << 20))
        self._ids = itertools.count(1)
        self._prep_pool = ThreadPoolExecutor(2, thread_name_prefix="ds4-prepare")

    # -- used by the API modules ------------------------------------------

    def next_id(self, prefix):
        return f"{prefix}{next(self._ids)}"

    def remember_calls(self, message):
        self.replay.remember(message)

    def render(self, fn, *args, **kw):
        try:
            return fn(*args, ctx=self.ctx, **kw)
        except ValueError as exc:
            raise rq.bad(str(exc) or "invalid JSON request") from None
        except (TypeError, AttributeError, KeyError):
            raise rq.bad() from None

    def tokenize(self, text, param, anthropic=False):
        ids = self.engine.tokenizer.encode(text, special=True)
        if len(ids) >= self.ctx:
            raise rq.context_error(len(ids), self.ctx, param, anthropic)
        return ids

    def model_object(self):
        ctx = self.ctx
        return {"id": MODEL_ID, "object": "model", "created": MODEL_CREATED, "owned_by": "ds4",
                "name": "DeepSeek V4 Flash", "context_length": ctx,
                "top_provider": {"context_length": ctx,
                                 "max_completion_tokens": min(rq.DEFAULT_MAX_TOKENS, ctx),
                                 "is_moderated": False},
                "supported_parameters": ["tools", "tool_choice", "max_tokens", "temperature",
                                         "top_p", "top_k", "min_p", "stop", "seed", "stream",
                                         "reasoning_effort"]}

    # -- the app -----------------------------------------------------------

    def make_app(self):
        app = web.Application(client_max_size=self.max_body, middlewares=[_middleware])
        app[SERVER_KEY] = self
        app.router.add_get("/health", _health)
        app.router.add_get("/v1/models", _models)
        app.router.add_get("/v1/models/{id}", _model)
        for path, module in (("/v1/chat/completions", openai_chat),
                             ("/v1/completions", openai_completions),
                             ("/v1/responses", responses), ("/v1/messages", anthropic),
                             ("/v1/messages/count_tokens", anthropic.TokenCount)):
            app.router.add_post(path, _endpoint(module))
        app.on_response_prepare.append(_cors_headers)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app):
        self.worker.start()

    async def _on_shutdown(self, app):
        self.worker.begin_stop()     # open streams end now instead of after the drain timeout

    async def _on_cleanup(self, app):
        await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)
        self._prep_pool.shutdown(wait=False)
        if self.worker.trace is not None:
            self.worker.trace.close()

    async def prepare(self, module, body, raw):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prep_pool, module.parse, self, body, raw)


def _endpoint(module):
    async def handler(request):
        server = request.app[SERVER_KEY]
        raw = await request.read()
        body = rq.parse_body(raw)
        prep = await server.prepare(module, body, raw)
        if server.worker.trace is not None:
            prep.extra.update(endpoint=request.path, request=raw.decode("utf-8", "replace"))
        return await module.respond(request, server, prep)
    return handler


async def _health(request):
    w = request.app[SERVER_KEY].worker
    return web.json_response({"status": "ok", "busy": w.busy, "queued": w.queued})


async def _models(request):
    return web.json_response({"object": "list",
                              "data": [request.app[SERVER_KEY].model_object()]})


async def _model(request):
    if request.match_info["id"] != MODEL_ID:
        raise rq.ApiError(404, f"model {request.match_info['id']!r} not found")
    return web.json_response(request.app[SERVER_KEY].model_object())


def error_response(request, status, message, kind=None, extra=None):
    extra = extra or {}
    if request.path.startswith("/v1/messages"):
        if kind in (None, "invalid_request_error", "server_error"):
            kind = _ANTHROPIC_KINDS.get(status, "api_error")
        body = {"type": "error", "error": {"type": kind, "message": message, **extra}}
    else:
        kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        body = {"error": {"message": message, "type": kind, **extra}}
    return web.json_response(body, status=status)


def _authorized(request, key):
    auth = request.headers.get("Authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key")
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


@web.middleware
async def _middleware(request, handler):
    server = request.app[SERVER_KEY]
    if request.method == "OPTIONS":
        return web.Response(status=204)
    if server.api_key and request.path != "/health" and not _authorized(request, server.api_key):
        return error_response(request, 401, "invalid or missing API key",
                              kind="authentication_error")
    try:
        return await handler(request)
    except rq.ApiError as e:
        return error_response(request, e.status, e.message, e.kind, e.extra)
    except web.HTTPRequestEntityTooLarge:
        return error_response(request, 413, f"request body larger than {server.max_body} bytes")
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        return error_response(request, 404, "unknown endpoint")
    except web.HTTPException as e:
        return error_response(request, e.status, e.reason)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as e:
        log.exception("request failed")
        return error_response(request, 500, f"internal error: {type(e).__name__}")


async def _cors_headers(request, response):
    if request.app[SERVER_KEY].cors:
        response.headers["Access-Control-Allow-Origin"] = "*"
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "*"


class ServerThread:
    """Runs a Server's app on its own event loop in a background thread
    (tests and the measurement script); ``port=0`` picks a free port."""

    def __init__(self, server, host="127.0.0.1", port=0):
        self.server = server
        self.host = host
        self.port = port
        self._ready = threading.Event()
        self._error = None
        self._thread = threading.Thread(target=self._main, name="ds4-http", daemon=True)

    def start(self):
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def _main(self):
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(self.server.make_app(), **_RUN_OPTIONS)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            self._stop = asyncio.Event()
        except Exception as exc:   # reported by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_until_complete(self._stop.wait())
        loop.run_until_complete(runner.cleanup())
        loop.close()

    def stop(self):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def listen_sockets(host="127.0.0.1", port=8080):
    """Listening TCP sockets for every address `host` resolves to (as aiohttp
    would bind them): `ds4 serve` takes its port before it loads the model,
    so a port in use fails at once, not after minutes of loading. Raises
    OSError, with nothing left open."""
    socks = []
    try:
        seen = set()
        for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                flags=socket.AI_PASSIVE):
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if socks[1:]:   # every address on the first one's port (port 0: its ephemeral one)
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
            sock.listen(128)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def serve(server, socks, host="127.0.0.1", log_fn=print):
    """Serves on listen_sockets' sockets until SIGINT/SIGTERM (the first one
    drains and saves; see worker.stop)."""
    app = server.make_app()
    port = socks[0].getsockname()[1]
    log_fn(f"ds4: serving {MODEL_ID} on http://{host}:{port} (ctx {server.ctx})")
    web.run_app(app, sock=socks, print=None, shutdown_timeout=10, **_RUN_OPTIONS)
