"""`ds4 serve`: OpenAI and Anthropic compatible HTTP server (prompt-and-server.md §4, §5.1).

Endpoints: ``GET /v1/models``, ``/v1/models/deepseek-v4-flash``, ``/health``;
``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/responses``,
``/v1/messages``. One inference worker serves the requests in order; the
live KV state is reused whenever a prompt extends the previous one, so an
agent that resends its whole conversation prefills only the new turn.

Clients (model ``deepseek-v4-flash``; any key unless ``--api-key`` is set):

- Claude Code: ``ANTHROPIC_BASE_URL=http://127.0.0.1:8080``,
  ``ANTHROPIC_AUTH_TOKEN=x``, ``ANTHROPIC_MODEL=deepseek-v4-flash`` (and the
  small/fast model alias too);
- Codex CLI: a provider with ``base_url = "http://127.0.0.1:8080/v1"`` and
  ``wire_api = "responses"``;
- OpenAI SDKs, opencode, Pi: base URL ``http://127.0.0.1:8080/v1`` (chat
  completions; send ``reasoning_content`` back on assistant messages).

Layout: app.py (aiohttp app, routes, middleware), openai_chat.py,
openai_completions.py, responses.py, anthropic.py (one module per API),
turn.py (one request through the worker as neutral events), worker.py (the
single inference worker, queue and prefix reuse), engine.py (the engine seam:
a ds4 Model, or scripted text for tests), requests.py (validation), sse.py,
bench.py (overhead and queueing measurements).
"""
from .app import Server, ServerThread, listen_sockets, serve
from .engine import MODEL_ID, ModelEngine, ScriptedEngine, load_engine

__all__ = ["MODEL_ID", "ModelEngine", "ScriptedEngine", "Server", "ServerThread", "listen_sockets",
           "load_engine", "serve"]
