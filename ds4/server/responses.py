"""POST /v1/responses: OpenAI Responses (Codex CLI; prompt-and-server.md §4.3-§4.6).

Input items become chat messages for the shared renderer; function calls are
reported whole at the end of the stream (not projected live), reasoning only
when ``reasoning.summary`` opts in.
"""
from __future__ import annotations

import os
import time
from contextlib import aclosing

from aiohttp import web

from ..chat import flatten_responses_content, render_chat
from ..dsml import ReasoningDelta, TextDelta
from . import requests as rq
from .openai_chat import collect, unsent_text
from .sse import SSE
from .turn import KEEPALIVE, Failure, Final, PromptDone, Turn

_SUMMARY_OPT_IN = ("auto", "concise", "detailed")
_IGNORED = ("compaction", "context_compaction")
_CALL_NAMES = {"local_shell_call": "local_shell", "web_search_call": "web_search_call",
               "tool_search_call": "tool_search", "image_generation_call": "image_generation_call"}
_OUTPUTS = ("function_call_output", "custom_tool_call_output", "local_shell_call_output",
            "web_search_call_output", "tool_search_output", "image_generation_call_output")


def _hex_id(prefix):
    return prefix + os.urandom(12).hex()


def _text(value):
    try:
        return flatten_responses_content(value)
    except ValueError:
        raise rq.bad() from None


def input_messages(body):
    """Responses input (+ instructions) as render_chat messages (§4.3 table)."""
    msgs = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise rq.bad("invalid JSON request: instructions must be a string")
        msgs.append({"role": "system", "content": instructions})
    items = body.get("input")
    if items is None:
        raise rq.bad("missing input")
    if isinstance(items, str):
        return msgs + [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise rq.bad("invalid JSON request: input must be a string or an array")
    reasoning = None       # a reasoning item waiting for its assistant turn
    last_assistant = None  # the message a following function_call merges into
    calls = set()          # call ids seen so far: outputs must answer one (§3.7)

    def flush_reasoning():
        nonlocal reasoning
        if reasoning is not None:
            msgs.append({"role": "assistant", "content": "", "reasoning_content": reasoning})
            reasoning = None

    for item in items:
        if not isinstance(item, dict):
            raise rq.bad()
        kind = item.get("type", "message")
        if item.get("status") not in (None, "completed"):
            raise rq.bad()
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise rq.bad()
            msg = {"role": role, "content": _text(item.get("content"))}
            if role == "assistant":
                if reasoning is not None:
                    msg["reasoning_content"], reasoning = reasoning, None
                last_assistant = msg
            else:
                if role == "user":
                    flush_reasoning()
                last_assistant = None
            msgs.append(msg)
        elif kind == "reasoning":
            parts = []
            for key in ("summary", "content"):
                for part in item.get(key) or ():
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        parts.append(part["text"])
            reasoning = "\n".join(parts)
            last_assistant = None
        elif kind in ("function_call", "custom_tool_call") or kind in _CALL_NAMES:
            if kind == "function_call":
                name = item.get("name")
                ns = item.get("namespace")
                if isinstance(ns, str) and isinstance(name, str):
                    name = ns + name
                args = item.get("arguments", "{}")
            elif kind == "custom_tool_call":
                name, args = item.get("name"), item.get("input", "")
            else:
                name = _CALL_NAMES[kind]
                args = next((item[k] for k in ("action", "arguments", "input") if k in item), {})
            if not isinstance(name, str) or not isinstance(args, (str, dict, list)):
                raise rq.bad()
            call = {"id": item.get("call_id") or item.get("id"), "name": name,
                    "arguments": args}
            calls.add(call["id"])
            if last_assistant is None:
                last_assistant = {"role": "assistant", "content": ""}
                if reasoning is not None:
                    last_assistant["reasoning_content"], reasoning = reasoning, None
                msgs.append(last_assistant)
            last_assistant.setdefault("tool_calls", []).append(call)
        elif kind in _OUTPUTS:
            if item.get("call_id") not in calls and kind != "tool_search_output":
                raise rq.bad(f"continuation state is not available for call_id "
                             f"{item.get('call_id')}; retry by replaying the full input history")
            flush_reasoning()
            last_assistant = None
            out = next((item[k] for k in ("output", "result", "tools") if k in item), "")
            if isinstance(out, (str, list)) and kind != "tool_search_output":
                out = _text(out)
            elif not isinstance(out, str):
                out = rq.dumps_compact(out)
            msgs.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": out})
        elif kind in _IGNORED:
            continue
        else:
            raise rq.bad()
    return msgs


def parse(server, body, raw) -> rq.Prepared:
    for key in ("previous_response_id", "conversation"):
        if body.get(key) is not None:
            raise rq.bad(f"{key} is not supported; replay full input instead")
    msgs = input_messages(body)
    think = rq.think_mode(body, "responses")
    reasoning = rq.obj(body, "reasoning") or {}
    tools = rq.tools_list(body)
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        raise rq.bad("forced tool_choice not supported")
    if choice is not None and not isinstance(choice, str):
        raise rq.bad()
    if choice not in (None, "auto", "none"):
        raise rq.bad(f"tool_choice={choice} not supported")
    if choice == "none":
        tools = None
    stream = rq.boolean(body, "stream") or False
    mt = rq.max_tokens(body, "max_output_tokens", "max_tokens")
    raw_tools = (rq.raw_member(raw, "tools") or tools) if tools else None
    rendered = server.render(render_chat, msgs, tools=raw_tools, think=think,
                             replay=server.replay)
    params = rq.sampling(body, think=rendered.think, top_k=False, min_p=False, seed=False)
    ids = server.tokenize(rendered.text, "input")
    return rq.Prepared(model=rq.model_name(body), text=rendered.text, ids=ids,
                       think=rendered.think, tools=bool(tools), max_tokens=mt, params=params,
                       keeps_reasoning=rendered.tool_context,
                       stop=[], stream=stream,
                       extra={"summary": reasoning.get("summary") in _SUMMARY_OPT_IN})


STATUS = {"stop": "completed", "tool_calls": "completed", "length": "incomplete",
          "error": "failed"}


def _reasoning_item(rid, text, status):
    return {"id": rid, "type": "reasoning", "status": status,
            "summary": [{"type": "summary_text", "text": text}]}


def _message_item(mid, text, status):
    return {"id": mid, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(call, status):
    return {"id": _hex_id("fc_"), "type": "function_call", "status": status, "name": call.name,
            "call_id": call.id, "arguments": call.arguments}


def _response(prep, rid, created, status, output, usage=None, finish=None):
    out = {"id": rid, "object": "response", "created_at": created, "status": status,
           "model": prep.model, "output": output}
    if finish == "length":
        out["incomplete_details"] = {"reason": "max_tokens"}
    if finish == "error":
        out["error"] = {"code": "server_error", "message": "generation failed"}
    if usage is not None:
        out["usage"] = usage.responses()
    return out


async def respond(request, server, prep: rq.Prepared):
    rid = _hex_id("resp_")
    created = int(time.time())
    summary = prep.extra["summary"]
    turn = Turn(server, prep, tail=None)
    if not prep.stream:
        final = await collect(turn)
        m = final.message
        item_status = "incomplete" if final.finish == "length" else "completed"
        output = []
        if summary and m.reasoning:
            output.append(_reasoning_item(_hex_id("rs_"), m.reasoning, item_status))
        if m.content or not m.tool_calls:
            output.append(_message_item(_hex_id("msg_"), m.content, item_status))
        output += [_call_item(c, item_status) for c in m.tool_calls]
        return web.json_response(_response(prep, rid, created, STATUS[final.finish], output,
                                           final.usage, final.finish))

    sse = SSE(request)
    seq = 0
    output = []           # finished items, in output order
    reasoning = None      # [index, id, text] while the reasoning item is open
    message = None        # [index, id, text] while the message item is open
    created_sent = False

    async def send(kind, **data):
        nonlocal seq
        await sse.send({"type": kind, "sequence_number": seq, **data})
        seq += 1

    async def ensure_created():
        nonlocal created_sent
        if not created_sent:
            created_sent = True
            await send("response.created", response=_response(prep, rid, created,
                                                               "in_progress", []))

    async with aclosing(turn.events()) as events:
        async for ev in events:
            if ev is KEEPALIVE:
                await sse.comment("prefill")
            elif isinstance(ev, PromptDone):
                await ensure_created()
            elif isinstance(ev, ReasoningDelta) and summary:
                if reasoning is None:
                    reasoning = [len(output) + (message is not None), _hex_id("rs_"), ""]
                    await send("response.output_item.added", output_index=reasoning[0],
                               item={"id": reasoning[1], "type": "reasoning",
                                     "status": "in_progress", "summary": []})
                    await send("response.reasoning_summary_part.added", item_id=reasoning[1],
                               output_index=reasoning[0], summary_index=0,
                               part={"type": "summary_text", "text": ""})
                reasoning[2] += ev.text
                await send("response.reasoning_summary_text.delta", item_id=reasoning[1],
                           output_index=reasoning[0], summary_index=0, delta=ev.text)
            elif isinstance(ev, TextDelta):
                if message is None:
                    message = [(reasoning is not None) + len(output), _hex_id("msg_"), ""]
                    await send("response.output_item.added", output_index=message[0],
                               item={"id": message[1], "type": "message",
                                     "status": "in_progress", "role": "assistant",
                                     "content": []})
                    await send("response.content_part.added", item_id=message[1],
                               output_index=message[0], content_index=0,
                               part={"type": "output_text", "text": "", "annotations": []})
                message[2] += ev.text
                await send("response.output_text.delta", item_id=message[1],
                           output_index=message[0], content_index=0, delta=ev.text)
            elif isinstance(ev, Failure):
                if not sse.open:
                    raise rq.ApiError(500, ev.message, kind="server_error")
                await send("error", error={"message": ev.message, "type": "server_error"})
                return await sse.close()
            elif isinstance(ev, Final):
                await ensure_created()
                m = ev.message
                st = "incomplete" if ev.finish == "length" else "completed"
                rest = unsent_text(m, message[2] if message else "")
                if rest and message is not None:
                    message[2] += rest
                    await send("response.output_text.delta", item_id=message[1],
                               output_index=message[0], content_index=0, delta=rest)
                items = {}
                if reasoning is not None:
                    idx, iid, text = reasoning
                    rst = "completed" if "</think>" in ev.text else "incomplete"
                    part = {"type": "summary_text", "text": text}
                    await send("response.reasoning_summary_text.done", item_id=iid,
                               output_index=idx, summary_index=0, text=text)
                    await send("response.reasoning_summary_part.done", item_id=iid,
                               output_index=idx, summary_index=0, part=part)
                    items[idx] = _reasoning_item(iid, text, rst)
                    await send("response.output_item.done", output_index=idx, item=items[idx])
                if message is not None:
                    idx, iid, text = message
                    part = {"type": "output_text", "text": text, "annotations": []}
                    await send("response.output_text.done", item_id=iid, output_index=idx,
                               content_index=0, text=text)
                    await send("response.content_part.done", item_id=iid, output_index=idx,
                               content_index=0, part=part)
                    items[idx] = _message_item(iid, text, st)
                    await send("response.output_item.done", output_index=idx, item=items[idx])
                output = [items[k] for k in sorted(items)]
                for call in m.tool_calls:
                    idx = len(output)
                    item = _call_item(call, "in_progress")
                    await send("response.output_item.added", output_index=idx,
                               item=dict(item, arguments=""))
                    await send("response.function_call_arguments.delta", item_id=item["id"],
                               output_index=idx, delta=call.arguments)
                    await send("response.function_call_arguments.done", item_id=item["id"],
                               output_index=idx, name=call.name, arguments=call.arguments)
                    item["status"] = "completed"
                    await send("response.output_item.done", output_index=idx, item=item)
                    output.append(item)
                status = STATUS[ev.finish]
                kind = {"completed": "response.completed", "incomplete": "response.incomplete",
                        "failed": "response.failed"}[status]
                await send(kind, response=_response(prep, rid, created, status, output,
                                                    ev.usage, ev.finish))
    return await sse.close()
