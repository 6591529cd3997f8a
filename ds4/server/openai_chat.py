"""POST /v1/chat/completions (prompt-and-server.md §4.3-§4.7)."""
from __future__ import annotations

import time
from contextlib import aclosing

from aiohttp import web

from ..chat import render_chat
from ..dsml import (ReasoningDelta, TextDelta, ToolCallDelta, ToolCallStart, new_tool_call_id)
from . import requests as rq
from .sse import SSE
from .turn import KEEPALIVE, Failure, Final, PromptDone, Turn


async def stream_failure(sse, failure):
    """The engine failed: a 500 before any output, else an SSE error event (OpenAI shape)."""
    if not sse.open:
        raise rq.ApiError(500, failure.message, kind="server_error")
    await sse.send({"error": {"message": failure.message, "type": "server_error"}}, event="error")
    return await sse.close()


OPENAI_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "error": "error"}


def tools_for_render(body, raw, tools):
    """The request's tools as raw client JSON (schema bytes kept, §2.5)."""
    if not tools:
        return None
    return rq.raw_member(raw, "tools") or tools


def parse(server, body, raw) -> rq.Prepared:
    msgs = rq.messages_list(body)
    think = rq.think_mode(body, "chat")
    tools = rq.tools_list(body)
    choice = body.get("tool_choice")
    if choice is not None and not isinstance(choice, (str, dict)):
        raise rq.bad("invalid JSON request: tool_choice must be a string or an object")
    if choice == "none":
        tools = None
    stream = rq.boolean(body, "stream") or False
    so = rq.obj(body, "stream_options") or {}
    mt = rq.max_tokens(body, "max_completion_tokens", "max_tokens")
    stop = rq.stop_list(body)
    rendered = server.render(render_chat, msgs, tools=tools_for_render(body, raw, tools),
                             think=think, replay=server.replay)
    params = rq.sampling(body, think=rendered.think)
    ids = server.tokenize(rendered.text, "messages")
    return rq.Prepared(model=rq.model_name(body), text=rendered.text, ids=ids,
                       think=rendered.think, tools=bool(tools), max_tokens=mt, params=params,
                       keeps_reasoning=rendered.tool_context,
                       stop=stop, stream=stream, include_usage=bool(so.get("include_usage")))


async def respond(request, server, prep: rq.Prepared):
    cid = server.next_id("chatcmpl-")
    created = int(time.time())
    turn = Turn(server, prep, new_id=lambda: new_tool_call_id("call_", server.replay),
                tail="openai")
    if not prep.stream:
        final = await collect(turn)
        m = final.message
        msg = {"role": "assistant", "content": m.content}
        if m.reasoning:
            msg["reasoning_content"] = m.reasoning
        if m.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in m.tool_calls]
        return web.json_response({
            "id": cid, "object": "chat.completion", "created": created, "model": prep.model,
            "choices": [{"index": 0, "message": msg, "finish_reason": OPENAI_FINISH[final.finish]}],
            "usage": final.usage.openai()})

    sse = SSE(request)

    def chunk(delta, finish=None):
        return {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": prep.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    whole = []            # calls not streamed live: sent in one chunk at the end (§4.6)
    text = ""
    async with aclosing(turn.events()) as events:
        async for ev in events:
            if ev is KEEPALIVE:
                await sse.comment("prefill")
            elif isinstance(ev, PromptDone):
                await sse.send(chunk({"role": "assistant"}))
            elif isinstance(ev, ReasoningDelta):
                await sse.send(chunk({"reasoning_content": ev.text}))
            elif isinstance(ev, TextDelta):
                text += ev.text
                await sse.send(chunk({"content": ev.text}))
            elif isinstance(ev, ToolCallStart):
                call = {"index": ev.index, "id": ev.id, "type": "function",
                        "function": {"name": ev.name, "arguments": ""}}
                if ev.live:
                    await sse.send(chunk({"tool_calls": [call]}))
                else:
                    whole.append(call)
            elif isinstance(ev, ToolCallDelta):
                if ev.live:
                    await sse.send(chunk({"tool_calls": [
                        {"index": ev.index, "function": {"arguments": ev.arguments}}]}))
                else:
                    whole[-1]["function"]["arguments"] = ev.arguments
            elif isinstance(ev, Failure):
                return await stream_failure(sse, ev)
            elif isinstance(ev, Final):
                rest = unsent_text(ev.message, text)
                if rest:
                    await sse.send(chunk({"content": rest}))
                if whole:
                    await sse.send(chunk({"tool_calls": whole}))
                await sse.send(chunk({}, OPENAI_FINISH[ev.finish]))
                if prep.include_usage:
                    body = chunk({})
                    body["choices"] = []
                    body["usage"] = ev.usage.openai()
                    await sse.send(body)
                await sse.send("[DONE]")
    return await sse.close()


def unsent_text(message, streamed):
    """Answer text the live projection held back (a tool block that failed to
    parse becomes plain content, §4.6)."""
    if message is None or message.tool_calls:
        return ""
    content = message.content
    if len(content) > len(streamed) and content.startswith(streamed):
        return content[len(streamed):]
    return ""


async def collect(turn):
    """Runs a non-streaming turn to its Final (500 on failure)."""
    final = None
    async with aclosing(turn.events()) as events:
        async for ev in events:
            if isinstance(ev, Failure):
                raise rq.ApiError(500, ev.message, kind="server_error")
            if isinstance(ev, Final):
                final = ev
    return final
