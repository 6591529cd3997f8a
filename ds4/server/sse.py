"""Server-sent events: opened lazily, so errors before the first byte can
still be a plain JSON status (prompt-and-server.md §4.1, §4.8)."""
from __future__ import annotations

import json

from aiohttp import web


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class SSE:
    def __init__(self, request):
        self.request = request
        self.response = None

    @property
    def open(self):
        return self.response is not None

    async def start(self):
        if self.response is None:
            resp = web.StreamResponse(status=200, headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(self.request)
            self.response = resp
        return self.response

    async def send(self, data, event=None):
        resp = await self.start()
        head = f"event: {event}\n" if event else ""
        body = data if isinstance(data, str) else dumps(data)
        await resp.write(f"{head}data: {body}\n\n".encode("utf-8"))

    async def comment(self, text="keepalive"):
        resp = await self.start()
        await resp.write(f": {text}\n\n".encode())

    async def close(self):
        resp = await self.start()
        await resp.write_eof()
        return resp
