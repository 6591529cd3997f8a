"""POST /v1/messages: Anthropic Messages (prompt-and-server.md §2.3, §4.4-§4.6)."""
from __future__ import annotations

from contextlib import aclosing

from aiohttp import web

from ..chat import messages_from_anthropic, render_chat
from ..dsml import (ReasoningDelta, ReasoningEnd, TextDelta, ToolCallDelta, ToolCallEnd,
                    ToolCallStart, new_tool_call_id)
from . import requests as rq
from .openai_chat import collect, unsent_text
from .sse import SSE
from .turn import KEEPALIVE, Failure, Final, PromptDone, Turn

STOP_REASON = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
               "error": "end_turn"}


def stop_reason(final):
    """Anthropic's reason; a client stop sequence is reported as such (ds4
    itself always says end_turn, spec §9.3)."""
    if final.stop_sequence is not None:
        return "stop_sequence"
    return STOP_REASON[final.finish]


def check_tool_results(msgs):
    """Every tool_result answers a tool_use earlier in the request: there is no
    server-side continuation state to resume from (§3.7)."""
    seen = set()
    for m in msgs:
        blocks = m.get("content") if isinstance(m.get("content"), list) else ()
        for b in blocks:
            if not isinstance(b, dict):
                continue
            if b.get("type") == "tool_use":
                seen.add(b.get("id"))
            elif b.get("type") == "tool_result" and b.get("tool_use_id") not in seen:
                raise rq.bad(f"continuation state is not available for tool_use_id "
                             f"{b.get('tool_use_id')}; retry by replaying the full messages "
                             f"history")


def parse(server, body, raw, *, counting=False) -> rq.Prepared:
    msgs = rq.messages_list(body)
    check_tool_results(msgs)
    mt = 0 if counting else rq.max_tokens(body, "max_tokens", required=True)
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise rq.bad("invalid JSON request: system must be a string or an array")
    think = rq.think_mode(body, "messages")
    tools = rq.tools_list(body)
    choice = rq.obj(body, "tool_choice")
    if choice is not None and choice.get("type") == "none":
        tools = None
    stream = rq.boolean(body, "stream") or False
    stop = rq.stop_list(body, "stop_sequences")
    rq.obj(body, "metadata")
    raw_tools = (rq.raw_member(raw, "tools") or tools) if tools else None
    rendered = server.render(render_chat, messages_from_anthropic(msgs, system),
                             tools=raw_tools, think=think, replay=server.replay)
    params = rq.sampling(body, think=rendered.think, min_p=False, seed=False)
    ids = server.tokenize(rendered.text, "messages", anthropic=True)
    return rq.Prepared(model=rq.model_name(body), text=rendered.text, ids=ids,
                       think=rendered.think, tools=bool(tools), max_tokens=mt, params=params,
                       keeps_reasoning=rendered.tool_context,
                       stop=stop, stream=stream)


class TokenCount:
    """POST /v1/messages/count_tokens: the rendered prompt's length (Claude Code asks)."""

    @staticmethod
    def parse(server, body, raw):
        return parse(server, body, raw, counting=True)

    @staticmethod
    async def respond(request, server, prep):
        return web.json_response({"input_tokens": len(prep.ids)})


async def respond(request, server, prep: rq.Prepared):
    mid = server.next_id("chatcmpl-")
    turn = Turn(server, prep, new_id=lambda: new_tool_call_id("toolu_", server.replay))
    if not prep.stream:
        final = await collect(turn)
        m = final.message
        content = []
        if m.reasoning:
            content.append({"type": "thinking", "thinking": m.reasoning, "signature": mid})
        if m.content or not m.tool_calls:
            content.append({"type": "text", "text": m.content})
        content += [c.to_anthropic() for c in m.tool_calls]
        return web.json_response({
            "id": mid, "type": "message", "role": "assistant", "model": prep.model,
            "content": content, "stop_reason": stop_reason(final),
            "stop_sequence": final.stop_sequence,
            "usage": final.usage.anthropic()})

    sse = SSE(request)
    index = -1
    open_kind = None      # "thinking" | "text" | "tool_use" | None
    wrote_visible = False
    text = ""

    async def send(kind, data):
        await sse.send(dict(type=kind, **data), event=kind)

    async def close_block():
        nonlocal open_kind
        if open_kind == "thinking":
            await send("content_block_delta", {"index": index, "delta": {
                "type": "signature_delta", "signature": mid}})
        if open_kind is not None:
            await send("content_block_stop", {"index": index})
        open_kind = None

    async def open_block(kind, block):
        nonlocal index, open_kind
        await close_block()
        index += 1
        open_kind = kind
        await send("content_block_start", {"index": index, "content_block": block})

    async with aclosing(turn.events()) as events:
        async for ev in events:
            if ev is KEEPALIVE:
                await sse.comment("prefill")
            elif isinstance(ev, PromptDone):
                await send("message_start", {"message": {
                    "id": mid, "type": "message", "role": "assistant", "model": prep.model,
                    "content": [], "stop_reason": None, "stop_sequence": None,
                    "usage": ev.usage.anthropic(final=False)}})
            elif isinstance(ev, ReasoningDelta):
                if open_kind != "thinking":
                    await open_block("thinking", {"type": "thinking", "thinking": "",
                                                  "signature": ""})
                await send("content_block_delta", {"index": index, "delta": {
                    "type": "thinking_delta", "thinking": ev.text}})
            elif isinstance(ev, ReasoningEnd):
                if open_kind == "thinking":
                    await close_block()
            elif isinstance(ev, TextDelta):
                if open_kind != "text":
                    await open_block("text", {"type": "text", "text": ""})
                text += ev.text
                wrote_visible = True
                await send("content_block_delta", {"index": index, "delta": {
                    "type": "text_delta", "text": ev.text}})
            elif isinstance(ev, ToolCallStart):
                wrote_visible = True
                await open_block("tool_use", {"type": "tool_use", "id": ev.id,
                                              "name": ev.name, "input": {}})
            elif isinstance(ev, ToolCallDelta):
                await send("content_block_delta", {"index": index, "delta": {
                    "type": "input_json_delta", "partial_json": ev.arguments}})
            elif isinstance(ev, ToolCallEnd):
                await close_block()
            elif isinstance(ev, Failure):
                if not sse.open:
                    raise rq.ApiError(500, ev.message, kind="api_error")
                await send("error", {"error": {"type": "api_error", "message": ev.message}})
                return await sse.close()
            elif isinstance(ev, Final):
                rest = unsent_text(ev.message, text)
                if rest:
                    if open_kind != "text":
                        await open_block("text", {"type": "text", "text": ""})
                    await send("content_block_delta", {"index": index, "delta": {
                        "type": "text_delta", "text": rest}})
                    wrote_visible = True
                await close_block()
                if not wrote_visible:
                    await open_block("text", {"type": "text", "text": ""})
                    await close_block()
                await send("message_delta", {
                    "delta": {"stop_reason": stop_reason(ev),
                              "stop_sequence": ev.stop_sequence},
                    "usage": {"output_tokens": ev.usage.completion}})
                await send("message_stop", {})
    return await sse.close()
