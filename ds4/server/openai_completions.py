"""POST /v1/completions: the prompt as one chat turn, the raw generated text
back (reasoning and ``</think>`` included; prompt-and-server.md §2.8)."""
from __future__ import annotations

import time
from contextlib import aclosing

from aiohttp import web

from ..chat import render_completion
from ..dsml import TextDelta
from . import requests as rq
from .openai_chat import OPENAI_FINISH, collect, stream_failure
from .sse import SSE
from .turn import KEEPALIVE, Failure, Final, Turn


def parse(server, body, raw) -> rq.Prepared:
    prompt = body.get("prompt")
    if prompt is None:
        raise rq.bad("missing prompt")
    if not isinstance(prompt, str) and not (
            isinstance(prompt, list) and any(isinstance(p, str) for p in prompt)):
        raise rq.bad("invalid JSON request: prompt must be a string or an array of strings "
                     "(token-id prompts are not supported)")
    think = rq.think_mode(body, "completions")
    stream = rq.boolean(body, "stream") or False
    so = rq.obj(body, "stream_options") or {}
    mt = rq.max_tokens(body, "max_tokens")
    stop = rq.stop_list(body)
    rendered = server.render(render_completion, prompt, think=think)
    params = rq.sampling(body, think=rendered.think)
    ids = server.tokenize(rendered.text, "prompt")
    return rq.Prepared(model=rq.model_name(body), text=rendered.text, ids=ids,
                       think=rendered.think, tools=False, max_tokens=mt, params=params,
                       stop=stop, stream=stream, include_usage=bool(so.get("include_usage")))


async def respond(request, server, prep: rq.Prepared):
    cid = server.next_id("cmpl-")
    created = int(time.time())
    turn = Turn(server, prep, raw=True)

    def body(text, finish=None):
        return {"id": cid, "object": "text_completion", "created": created, "model": prep.model,
                "choices": [{"text": text, "index": 0, "finish_reason": finish}]}

    if not prep.stream:
        final = await collect(turn)
        out = body(final.text, OPENAI_FINISH[final.finish])
        out["usage"] = final.usage.openai()
        return web.json_response(out)

    sse = SSE(request)
    async with aclosing(turn.events()) as events:
        async for ev in events:
            if ev is KEEPALIVE:
                await sse.comment("prefill")
            elif isinstance(ev, TextDelta):
                await sse.send(body(ev.text))
            elif isinstance(ev, Failure):
                return await stream_failure(sse, ev)
            elif isinstance(ev, Final):
                await sse.send(body("", OPENAI_FINISH[ev.finish]))
                if prep.include_usage:
                    u = body("")
                    u["choices"] = []
                    u["usage"] = ev.usage.openai()
                    await sse.send(u)
                await sse.send("[DONE]")
    return await sse.close()
