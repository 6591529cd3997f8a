"""`ds4 serve`: OpenAI and Anthropic compatible HTTP server (prompt-and-server.md §4, §5.1).

Layout: app.py (aiohttp app, routes, middleware), openai_chat.py,
openai_completions.py, responses.py, anthropic.py (one module per API),
turn.py (one request through the worker as neutral events), worker.py (the
single inference worker, queue and prefix reuse), engine.py (the engine seam:
a ds4 Model, or scripted text for tests), requests.py (validation), sse.py.
"""
from .app import Server, ServerThread, serve
from .engine import MODEL_ID, ModelEngine, ScriptedEngine, load_engine

__all__ = ["MODEL_ID", "ModelEngine", "ScriptedEngine", "Server", "ServerThread", "load_engine",
           "serve"]
