"""DeepSeek V4 chat template (spec: prompt-and-server.md §2).

Renders a conversation as the prompt TEXT the model reads; the BOS is written
as text (``<｜begin▁of▁sentence｜>``) and the tokenizer maps it to id 0.

Main entry point::

    from ds4.chat import render_chat
    p = render_chat([{"role": "user", "content": "Hello"}], think="high")
    p.text            # '<｜begin▁of▁sentence｜><｜User｜>Hello<｜Assistant｜><think>'
    p.think           # mode actually used ("max" may fall back to "high")
    p.warnings        # e.g. the Think Max context warning

Two layouts (§2.9). ``layout="ds4"`` (default) is ds4's server renderer: all
system/developer text hoisted after BOS, the tools block before it, client
schema bytes kept, structural escapes, old reasoning kept whenever the
conversation involves tools. ``layout="official"`` is DeepSeek's published
``encoding_dsv4``. Single-turn prompts without tools are identical in both.

Messages are dicts in the OpenAI shape, with Anthropic content blocks
accepted too:

- ``role``: ``system`` | ``developer`` | ``user`` | ``assistant`` | ``tool``
  (``function`` = ``tool``; missing = ``user``; other roles are dropped);
- ``content``: str, None, or a list of parts: strings and objects with a
  ``text`` field are concatenated with no separator (images and unknown
  parts dropped); Anthropic ``thinking`` blocks become reasoning,
  ``tool_use`` blocks tool calls, ``tool_result`` blocks tool results;
- ``reasoning_content`` (or ``reasoning`` / ``thinking``): assistant reasoning;
- ``tool_calls``: OpenAI entries (``function.arguments`` as JSON text or an
  object), flat ``{"id", "name", "arguments"}`` or ``{"id", "name",
  "input"}``; entries without a name or arguments are dropped;
- ``tool_call_id`` on tool messages;
- ``raw_dsml`` (ds4 extension) on an assistant message: the exact sampled
  DSML block to insert instead of canonical DSML (see also ``replay=``).

Helpers for the CLI/REPL (§2.8, §1.6 CLI path), the completions endpoint,
thinking controls of requests (§2.1), tool schema lines (§2.5) and the
per-API content flattening (§2.3) are below.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from .dsml import (_JSONError, _scan_string, _scan_value, _skip_ws, as_tool_call, json_escape,
                   render_tool_calls)

__all__ = [
    "BOS", "EOS", "USER", "ASSISTANT", "THINK_OPEN", "THINK_CLOSE",
    "THINK_MAX_PREFIX", "THINK_MAX_MIN_CTX", "DEFAULT_SYSTEM", "THINK_MODES",
    "RenderedPrompt", "Segment", "render_chat", "resolve_think", "assistant_prefix",
    "render_user_turn", "render_transcript_start", "render_prompt", "render_completion",
    "render_assistant_turn", "render_tail", "set_think_max_prefix",
    "prompt_segments", "transcript_start_segments", "user_turn_segments",
    "segments_text", "is_prerendered", "think_from_request", "tool_schema_lines",
    "tools_block", "flatten_content", "flatten_responses_content",
    "anthropic_system_text", "messages_from_anthropic", "escape_tool_result",
]

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
LATEST_REMINDER = "<｜latest_reminder｜>"

THINK_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem "
    "to resolve the root cause, rigorously stress-testing your logic against all potential "
    "paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate "
    "step, considered alternative, and rejected hypothesis to ensure absolutely no "
    "assumption is left unchecked.\n\n")
THINK_MAX_MIN_CTX = 393_216
DEFAULT_SYSTEM = "You are a helpful assistant"
THINK_MODES = ("none", "high", "max")
LAYOUTS = ("ds4", "official")

_TOOLS_HEAD = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user{q}. "
    'You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:\n\n'
    "<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="$TOOL_NAME">\n'
    '<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>\n'
    "...\n"
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="$TOOL_NAME2">\n'
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\n"
    "{strings}"
    "For all other types (numbers, booleans, arrays, objects), pass the value in JSON format "
    'and set `string="false"`.\n\n'
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete "
    "reasoning inside <think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n")
_TOOLS_STRINGS_DS4 = (
    'String parameters should be specified as raw text and set `string="true"`. '
    "Preserve characters such as `>`, `&`, and `&&` exactly; never replace normal string "
    "characters with XML or HTML entity escapes. Only if a string value itself contains the "
    "exact closing parameter tag `</｜DSML｜parameter>`, write that tag as "
    "`&lt;/｜DSML｜parameter>` inside the value. ")
_TOOLS_STRINGS_OFFICIAL = 'String parameters should be specified as is and set `string="true"`. '
_TOOLS_TAIL = ("\n\nYou MUST strictly follow the above defined tool name and parameter "
               "schemas to invoke tool calls.")
_TOOLS_TAIL_DS4 = _TOOLS_TAIL + " Use the exact parameter names from the schemas."
_TOOLS_TAIL_OFFICIAL = _TOOLS_TAIL + "\n"
_RESPONSE_FORMAT = ("## Response Format:\n\nYou MUST strictly adhere to the following schema "
                    "to reply:\n{schema}")


@dataclass(frozen=True)
class RenderedPrompt:
    """A rendered prompt. ``think`` is the mode actually used, ``requested``
    the one asked for; ``warnings`` explains any difference."""
    text: str
    think: str
    requested: str
    warnings: tuple = ()
    tool_context: bool = False   # earlier turns keep their reasoning (tools involved)

    def __str__(self):
        return self.text


@dataclass(frozen=True)
class Segment:
    """A piece of a CLI prompt: ``special`` pieces are one special token each
    (looked up by string), the others are BPE-encoded as plain text with no
    special-token recognition (§1.6 CLI path)."""
    text: str
    special: bool = False


# ---------------------------------------------------------------------------
# Thinking modes (§2.1)

def _norm_think(think) -> str:
    if think is True:
        return "high"
    if think is False or think is None:
        return "none"
    if think not in THINK_MODES:
        raise ValueError(f"think must be one of {THINK_MODES}, not {think!r}")
    return think


def resolve_think(think="high", ctx: int | None = None):
    """(mode used, warnings). Think Max needs a context of at least 393,216
    tokens (DeepSeek's recommendation); below that, or when ``ctx`` is not
    known, it falls back to ``high`` with a warning."""
    think = _norm_think(think)
    if think == "max" and (ctx is None or ctx < THINK_MAX_MIN_CTX):
        have = "not given" if ctx is None else f"{ctx}"
        return "high", (f"Think Max needs a context of at least {THINK_MAX_MIN_CTX} tokens "
                        f"(ctx {have}); using normal thinking (high) instead",)
    return think, ()


def assistant_prefix(think="high") -> str:
    """What opens the model's turn: ``<｜Assistant｜><think>`` when thinking,
    ``<｜Assistant｜></think>`` when not."""
    return ASSISTANT + (THINK_CLOSE if _norm_think(think) == "none" else THINK_OPEN)


def _mode_from_effort(value):
    if value is None:
        return None
    if value == "max":
        return "max"
    if value in ("xhigh", "high", "medium", "low", "minimal"):
        return "high"
    if value == "none":
        return "none"
    raise ValueError("invalid JSON request")


def think_from_request(body: dict, api: str = "chat") -> str:
    """The thinking mode a request asks for (§2.1), before the context gate.

    ``api``: ``chat``, ``completions``, ``messages`` (Anthropic) or
    ``responses``. Default is thinking (``high``). ``thinking``
    (``{"type": "enabled"|"disabled"}`` or bool) and ``think`` (bool) switch
    it; effort fields (``reasoning_effort``, Anthropic
    ``output_config.effort``, Responses ``reasoning.effort``) pick the level
    (``max``; ``xhigh``..``minimal`` = ``high``; ``none`` = off) and an
    explicit "disabled" wins. Model ``deepseek-chat`` means off and
    ``deepseek-reasoner`` on unless the request has an explicit control.
    Raises ValueError("invalid JSON request") for an unknown effort string or
    a non-bool ``think``.
    """
    enabled, explicit, effort = True, False, "high"

    def take_effort(v):
        nonlocal effort
        if v is not None and not isinstance(v, str):
            raise ValueError("invalid JSON request")
        m = _mode_from_effort(v)
        if m is not None:
            effort = m
        return m

    if api in ("chat", "completions", "messages") and "thinking" in body:
        t = body["thinking"]
        explicit = True
        if isinstance(t, bool):
            enabled = t
        elif isinstance(t, dict):
            if t.get("type") == "enabled":
                enabled = True
            elif t.get("type") == "disabled":
                enabled = False
    if api in ("chat", "completions") and "think" in body:
        t = body["think"]
        if not isinstance(t, bool):
            raise ValueError("invalid JSON request")
        enabled = t
        explicit = True
    if api in ("chat", "completions", "messages") and "reasoning_effort" in body:
        take_effort(body["reasoning_effort"])
    if api == "messages" and isinstance(body.get("output_config"), dict):
        take_effort(body["output_config"].get("effort"))
    if api == "responses" and isinstance(body.get("reasoning"), dict):
        if take_effort(body["reasoning"].get("effort")) is not None:
            explicit = True
            if effort == "none":
                enabled = False
    model = body.get("model")
    if not explicit and model == "deepseek-chat":
        enabled = False
    if not explicit and model == "deepseek-reasoner":
        enabled = True
    if not enabled or effort == "none":
        return "none"
    return effort


# ---------------------------------------------------------------------------
# Content flattening (§2.3)

def _text_of(content) -> str:
    """Strings and ``text`` fields concatenated (OpenAI content, Anthropic
    tool_result content, reasoning given as parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for item in content:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                out.append(item["text"])
        return "".join(out)
    return ""


def flatten_content(content) -> str:
    """OpenAI chat content as text: a string, None (= ""), or parts whose
    strings and ``text`` fields are concatenated with no separator."""
    return _text_of(content)


_RESPONSES_TEXT_TYPES = ("input_text", "output_text", "text", "summary_text", "reasoning_text")


def flatten_responses_content(content) -> str:
    """Responses API content as text; any block type other than the text
    kinds raises ValueError (a 400)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError("invalid JSON request")
    out = []
    for item in content:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict) and item.get("type") in _RESPONSES_TEXT_TYPES:
            out.append(_text_of([item]))
        else:
            raise ValueError("invalid JSON request")
    return "".join(out)


def anthropic_system_text(system) -> str:
    """Anthropic ``system`` (string, or strings / ``{text}`` blocks) as one
    text: parts joined with ``\\n`` unless the text so far already ends with
    one; empty parts and parts starting ``x-anthropic-`` (Claude Code's
    billing header) are dropped."""
    if system is None:
        return ""
    parts = [system] if isinstance(system, str) else system if isinstance(system, list) else []
    out = ""
    for p in parts:
        if isinstance(p, dict):
            p = p.get("text")
        if not isinstance(p, str) or not p or p.startswith("x-anthropic-"):
            continue
        if out and not out.endswith("\n"):
            out += "\n"
        out += p
    return out


def messages_from_anthropic(messages, system=None) -> list:
    """An Anthropic Messages request as render_chat input: the system text
    (if any) becomes a leading system message; the messages' content blocks
    are understood by render_chat as they are."""
    out = []
    text = anthropic_system_text(system)
    if text:
        out.append({"role": "system", "content": text})
    out.extend(messages or ())
    return out


def escape_tool_result(text: str) -> str:
    """ds4's only tool-result escape: ``</tool_result>`` -> ``&lt;/tool_result>``."""
    return text.replace("</tool_result>", "&lt;/tool_result>")


@dataclass
class _Msg:
    role: str
    parts: list = field(default_factory=list)   # ("text", s) | ("tool_result", s, id)
    reasoning: str | None = None
    calls: list = field(default_factory=list)
    raw_dsml: str | None = None
    tool_call_id: str | None = None
    src: dict = field(default_factory=dict)

    def text(self) -> str:
        """Content as ds4 renders it (tool results wrapped and escaped)."""
        out = []
        for p in self.parts:
            if p[0] == "text":
                out.append(p[1])
            else:
                out.append("<tool_result>" + escape_tool_result(p[1]) + "</tool_result>")
        return "".join(out)


def _normalize(m) -> _Msg | None:
    if not isinstance(m, dict):
        raise TypeError(f"a message must be a dict, not {type(m).__name__}")
    role = m.get("role") or "user"
    msg = _Msg(role=role, src=m)
    reasoning = []
    content = m.get("content")
    if isinstance(content, str):
        msg.parts.append(("text", content))
    elif isinstance(content, list):
        for item in content:
            if isinstance(item, str):
                msg.parts.append(("text", item))
                continue
            if not isinstance(item, dict):
                continue
            t = item.get("type")
            if t == "tool_use":
                call = as_tool_call({"id": item.get("id"), "name": item.get("name"),
                                     "input": item.get("input", {})})
                msg.calls.append(call)
            elif t == "tool_result":
                msg.parts.append(("tool_result", _text_of(item.get("content")),
                                  item.get("tool_use_id") or item.get("id"), item.get("content")))
            else:
                if isinstance(item.get("text"), str):
                    msg.parts.append(("text", item["text"]))
                if isinstance(item.get("thinking"), str):
                    reasoning.append(item["thinking"])
    for key in ("reasoning_content", "reasoning", "thinking"):
        if m.get(key) is not None:
            reasoning.insert(0, _text_of(m[key]))
            break
    msg.reasoning = "".join(reasoning) if reasoning else None
    for tc in m.get("tool_calls") or ():
        call = as_tool_call(tc)
        if call is not None:
            msg.calls.append(call)
    if isinstance(m.get("raw_dsml"), str) and m["raw_dsml"]:
        msg.raw_dsml = m["raw_dsml"]
    tcid = m.get("tool_call_id")
    msg.tool_call_id = tcid if isinstance(tcid, str) else None
    return msg


# ---------------------------------------------------------------------------
# Tool schemas (§2.5)

def raw_json_members(text: str):
    """[(key, raw value text)] of a JSON object, or None."""
    try:
        i = _skip_ws(text, 0)
        if i >= len(text) or text[i] != "{":
            return None
        i = _skip_ws(text, i + 1)
        out = []
        while i < len(text) and text[i] != "}":
            if text[i] != '"':
                return None
            key, i = _scan_string(text, i)
            i = _skip_ws(text, i)
            if i >= len(text) or text[i] != ":":
                return None
            i = _skip_ws(text, i + 1)
            end = _scan_value(text, i)
            out.append((key, text[i:end]))
            i = _skip_ws(text, end)
            if i < len(text) and text[i] == ",":
                i = _skip_ws(text, i + 1)
        return out if i < len(text) else None
    except _JSONError:
        return None


def _json_string_value(raw):
    try:
        v = json.loads(raw)
    except ValueError:
        return None
    return v if isinstance(v, str) else None


def _compact(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _schema_lines_of(item) -> list:
    """Schema lines for one client tool item (raw JSON text or an object)."""
    if isinstance(item, dict):
        if "function" in item:
            fn = item["function"]
            return [fn if isinstance(fn, str) else _compact(fn)]
        if item.get("type") in ("namespace", "tool_search"):
            return _schema_lines_of(_compact(item))
        return [_compact(item)]
    if not isinstance(item, str):
        return []
    raw = item.strip(" \t\n\r")
    members = raw_json_members(raw)
    if members is None:
        return [raw] if raw else []
    d = dict(members)
    if "function" in d:
        return [d["function"]]
    typ = _json_string_value(d["type"]) if "type" in d else None
    if typ == "namespace" and "tools" in d and _json_string_value(d.get("name", "null")):
        ns = _json_string_value(d["name"])
        lines = []
        for t in _raw_array_items(d["tools"]):
            line = _namespace_line(dict(raw_json_members(t) or ()), ns)
            if line:
                lines.append(line)
        if lines:
            return lines
    if typ == "tool_search":
        desc = _json_string_value(d["description"]) if "description" in d else None
        return [_tool_search_line(desc, d.get("parameters"))]
    return [raw]


def _raw_array_items(text: str) -> list:
    out = []
    try:
        i = _skip_ws(text, 0)
        if text[i] != "[":
            return out
        i = _skip_ws(text, i + 1)
        while i < len(text) and text[i] != "]":
            end = _scan_value(text, i)
            out.append(text[i:end])
            i = _skip_ws(text, end)
            if i < len(text) and text[i] == ",":
                i = _skip_ws(text, i + 1)
    except (_JSONError, IndexError):
        pass
    return out


def _namespace_line(d: dict, ns: str):
    """ds4's synthesized schema line for a function inside a Responses
    namespace. ``d`` maps keys to raw JSON value text."""
    for key in ("type", "name", "description"):
        if key in d and _json_string_value(d[key]) is None:
            return None
    typ = _json_string_value(d["type"]) if "type" in d else None
    name = _json_string_value(d["name"]) if "name" in d else None
    if (typ is not None and typ != "function") or not name:
        return None
    desc = _json_string_value(d["description"]) if "description" in d else None
    params = d.get("parameters", d.get("input_schema"))
    return ('{"name":' + json_escape(ns + name) + ',"description":' + json_escape(desc or "")
            + ',"parameters":' + (params or '{"type":"object","properties":{}}') + "}")


def _tool_search_line(desc, params) -> str:
    return ('{"name":"tool_search","description":'
            + json_escape(desc if desc is not None else "Search available tools.")
            + ',"parameters":' + (params or '{"type":"object","properties":{}}') + "}")


def tool_schema_lines(tools) -> list:
    """One schema line per tool, as ds4 renders them (§2.5).

    ``tools`` is a list of tool items, each the client's raw JSON text (str,
    preferred: its bytes are kept exactly, pretty-printing included) or a
    parsed object (serialized compactly). OpenAI ``{"type": "function",
    "function": {...}}`` gives the ``function`` value; a Responses namespace
    gives one synthesized line per function (name = namespace + name); a
    Responses ``tool_search`` item a synthesized line; anything else
    (Anthropic tools, Responses flat functions) the whole object. A raw JSON
    array text is accepted for ``tools`` too.
    """
    if tools is None:
        return []
    if isinstance(tools, str):
        tools = _raw_array_items(tools)
    lines = []
    for item in tools:
        lines.extend(x for x in _schema_lines_of(item) if x)
    return lines


def _official_tool_objects(tools) -> list:
    out = []
    if isinstance(tools, str):
        tools = json.loads(tools)
    for item in tools or ():
        if isinstance(item, str):
            item = json.loads(item)
        if isinstance(item, dict) and isinstance(item.get("function"), dict):
            item = item["function"]
        out.append(item)
    return out


def tools_block(schema_lines, *, layout: str = "ds4") -> str:
    """The tools block text (§2.5) for the given schema lines; ``""`` if none.
    ds4's ends without a newline, the official one with ``\\n``."""
    if not schema_lines:
        return ""
    if layout == "official":
        head = _TOOLS_HEAD.format(q="'s question", strings=_TOOLS_STRINGS_OFFICIAL)
        return head + "\n".join(schema_lines) + _TOOLS_TAIL_OFFICIAL
    head = _TOOLS_HEAD.format(q=" question", strings=_TOOLS_STRINGS_DS4)
    return head + "\n".join(schema_lines) + _TOOLS_TAIL_DS4


# ---------------------------------------------------------------------------
# Rendering (§2.2)

def render_chat(messages, *, tools=None, think="high", ctx: int | None = None,
                layout: str = "ds4", add_generation_prompt: bool = True,
                replay=None) -> RenderedPrompt:
    """Render a conversation as prompt text.

    ``tools``: tool items (see :func:`tool_schema_lines`); None or empty =
    no tools block (pass None for ``tool_choice: "none"``; the history is
    still rendered). ``think``: ``"none"`` | ``"high"`` | ``"max"`` (bools
    accepted); ``"max"`` needs ``ctx`` >= 393,216, else ``high`` plus a
    warning. ``add_generation_prompt``: end with the open assistant prefix
    when the last turn is the user's/tool's (``<｜Assistant｜><think>`` or
    ``</think>``). ``replay``: a :class:`ds4.dsml.ToolReplayMemory`; an
    assistant message whose calls all map to one remembered block gets that
    block verbatim (ds4 layout only).

    Reasoning of earlier assistant turns (ds4 layout): with thinking and no
    tools anywhere (no tools block, no tool calls, no tool messages) it is
    dropped and the turn is rendered ``<｜Assistant｜></think>content``;
    with tools it is kept as ``<think>reasoning</think>``; assistant turns
    after the last user/tool message always keep it. Non-thinking renders
    every turn as ``</think>content``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    requested = _norm_think(think)
    mode, warnings = resolve_think(requested, ctx)
    msgs = [_normalize(m) for m in messages or ()]
    if layout == "official":
        text, dropped, keeps = _render_official(msgs, tools, mode, add_generation_prompt)
        warnings += tuple(f"official layout: dropped message with role {r!r}" for r in dropped)
        return RenderedPrompt(text, mode, requested, warnings, keeps)
    text, tool_context = _render_ds4(msgs, tools, mode, add_generation_prompt, replay)
    return RenderedPrompt(text, mode, requested, warnings, tool_context)


def _calls_text(m: _Msg, replay) -> str:
    if not m.calls:
        return ""
    if m.raw_dsml:
        return m.raw_dsml
    if replay is not None:
        block = replay.block_for([c.id for c in m.calls])
        if block is not None:
            return block
    return render_tool_calls(m.calls)


def _render_ds4(msgs, tools, mode, add_generation_prompt, replay):
    think = mode != "none"
    schemas = tool_schema_lines(tools)
    tool_context = bool(schemas) or any(
        (m.role == "assistant" and m.calls) or m.role in ("tool", "function") for m in msgs)
    system = tools_block(schemas)
    for m in msgs:
        if m.role in ("system", "developer"):
            if system:
                system += "\n\n"
            system += m.text()
    last_user = max((i for i, m in enumerate(msgs) if m.role in ("user", "tool", "function")),
                    default=-1)
    out = [BOS]
    if mode == "max":
        out.append(THINK_MAX_PREFIX)
    out.append(system)
    out.append(_render_turns(msgs, 0, think, last_user, tool_context, add_generation_prompt,
                             replay))
    return "".join(out), tool_context


def _render_turns(msgs, start, think, last_user, keep_reasoning, add_generation_prompt,
                  replay):
    out = []
    pending_assistant = pending_tool = False
    for i in range(start, len(msgs)):
        m = msgs[i]
        if m.role == "user":
            out.append(USER + m.text())
            pending_assistant, pending_tool = True, False
        elif m.role in ("tool", "function"):
            if not pending_tool:
                out.append(USER)
            out.append("<tool_result>" + escape_tool_result(_text_of(
                [p[1] for p in m.parts])) + "</tool_result>")
            pending_assistant = pending_tool = True
        elif m.role == "assistant":
            if pending_assistant:
                out.append(ASSISTANT)
                if think and (keep_reasoning or i > last_user):
                    out.append(THINK_OPEN + (m.reasoning or "") + THINK_CLOSE)
                else:
                    out.append(THINK_CLOSE)
            out.append(m.text() + _calls_text(m, replay) + EOS)
            pending_assistant = pending_tool = False
        # system/developer are hoisted; any other role is dropped
    if pending_assistant and add_generation_prompt:
        out.append(ASSISTANT + (THINK_OPEN if think else THINK_CLOSE))
    return "".join(out)


def render_tail(messages, start: int, *, think="high", replay=None) -> str:
    """The text to append to a live KV that already holds a tool-call turn
    (§3.7): EOS, then messages[start:] (tool results, user text, ...), then
    the assistant prefix. System messages are skipped; an assistant message
    in the tail keeps its reasoning."""
    mode = _norm_think(think)
    msgs = [_normalize(m) for m in messages or ()]
    return EOS + _render_turns(msgs, start, mode != "none", -1, True, True, replay)


# -- DeepSeek's official encoding (encoding_dsv4) ---------------------------

def _render_official(msgs, tools, mode, add_generation_prompt):
    thinking = mode != "none"
    dropped = []
    items = []          # dicts: role, blocks/content, reasoning, calls, tools, ...
    for m in msgs:
        role = "tool" if m.role == "function" else m.role
        if role not in ("system", "developer", "user", "assistant", "tool", "latest_reminder"):
            dropped.append(m.role)
            continue
        it = {"role": role, "m": m}
        if role in ("system", "developer") and m.src.get("tools"):
            it["tools"] = _official_tool_objects(m.src["tools"])
        items.append(it)
    tool_objs = _official_tool_objects(tools) if tools else []
    if tool_objs:
        if items and items[0]["role"] == "system":
            items[0]["tools"] = items[0].get("tools", []) + tool_objs
        else:
            items.insert(0, {"role": "system", "m": _Msg("system"), "tools": tool_objs})

    # merge tool results and consecutive user messages into user messages
    merged = []
    for it in items:
        role, m = it["role"], it["m"]
        if role == "tool":
            block = ("tool_result", _official_tool_text(m.src.get("content")), m.tool_call_id)
            if merged and merged[-1]["role"] == "user":
                merged[-1]["blocks"].append(block)
            else:
                merged.append({"role": "user", "blocks": [block], "m": m})
        elif role == "user":
            blocks = []
            for p in m.parts:
                if p[0] == "text" and blocks and blocks[-1][0] == "text":
                    blocks[-1] = ("text", blocks[-1][1] + p[1])
                elif p[0] == "text":
                    blocks.append(p)
                else:
                    blocks.append(("tool_result", _official_tool_text(p[3]), p[2]))
            if not blocks:
                blocks = [("text", "")]
            if merged and merged[-1]["role"] == "user":
                merged[-1]["blocks"].extend(blocks)
            else:
                merged.append({"role": "user", "blocks": blocks, "m": m})
        else:
            merged.append(it)

    # tool results in the order of the calls that asked for them
    order = {}
    for it in merged:
        if it["role"] == "assistant" and it["m"].calls:
            order = {c.id: k for k, c in enumerate(it["m"].calls) if c.id}
        elif it["role"] == "user" and order:
            results = [b for b in it["blocks"] if b[0] == "tool_result"]
            if len(results) > 1:
                results.sort(key=lambda b: order.get(b[2] or "", 0))
                it["blocks"] = [results.pop(0) if b[0] == "tool_result" else b
                                for b in it["blocks"]]

    drop = not any(it.get("tools") for it in merged)
    if thinking and drop:
        last = _official_last_user(merged)
        kept = []
        for i, it in enumerate(merged):
            if it["role"] in ("user", "system", "tool", "latest_reminder") or i >= last:
                kept.append(it)
            elif it["role"] == "assistant":
                kept.append(dict(it, no_reasoning=True))
        merged = kept

    last = _official_last_user(merged)
    out = [BOS]
    for i, it in enumerate(merged):
        role, m = it["role"], it["m"]
        if i == 0 and thinking and mode == "max":
            out.append(THINK_MAX_PREFIX)
        if role in ("system", "developer"):
            text = m.text()
            if role == "developer":
                text = USER + text
            if it.get("tools"):
                text += "\n\n" + tools_block([_official_json(t) for t in it["tools"]],
                                             layout="official")
            rf = m.src.get("response_format")
            if rf:
                text += "\n\n" + _RESPONSE_FORMAT.format(schema=_official_json(rf))
            out.append(text)
        elif role == "user":
            parts = [b[1] if b[0] == "text" else "<tool_result>" + b[1] + "</tool_result>"
                     for b in it["blocks"]]
            out.append(USER + "\n\n".join(parts))
        elif role == "latest_reminder":
            out.append(LATEST_REMINDER + m.text())
        else:  # assistant
            reasoning = ""
            if thinking and (not drop or i > last):
                reasoning = ("" if it.get("no_reasoning") else (m.reasoning or "")) + THINK_CLOSE
            calls = render_tool_calls(m.calls, layout="official") if m.calls else ""
            out.append(reasoning + m.text() + calls + ("" if m.src.get("wo_eos") else EOS))
        nxt = merged[i + 1]["role"] if i + 1 < len(merged) else None
        if nxt not in (None, "assistant", "latest_reminder"):
            continue
        if nxt is None and not add_generation_prompt:
            continue
        if role in ("user", "developer"):
            if thinking and (not drop or i >= last):
                out.append(ASSISTANT + THINK_OPEN)
            else:
                out.append(ASSISTANT + THINK_CLOSE)
    return "".join(out), dropped, not drop


def _official_tool_text(content) -> str:
    """A tool result's text as encoding_dsv4 writes it: text blocks joined
    with a blank line, other blocks as ``[Unsupported TYPE]``."""
    if content is None:
        return ""
    if not isinstance(content, list):
        return content if isinstance(content, str) else ""
    parts = []
    for b in content:
        if isinstance(b, str):
            parts.append(b)
        elif isinstance(b, dict) and b.get("type") == "text":
            parts.append(b.get("text", ""))
        else:
            parts.append(f"[Unsupported {b.get('type') if isinstance(b, dict) else type(b).__name__}]")
    return "\n\n".join(parts)


def _official_last_user(items) -> int:
    return max((i for i, it in enumerate(items) if it["role"] in ("user", "developer")),
               default=-1)


def _official_json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------
# Single-prompt renderings, CLI and REPL (§2.8)

def render_transcript_start(system: str | None = DEFAULT_SYSTEM, *, think="high",
                            ctx: int | None = None) -> RenderedPrompt:
    """BOS, the Think Max prefix when ``max`` applies, then the system text
    (``None`` or ``""``: no system text). The start of a REPL transcript."""
    requested = _norm_think(think)
    mode, warnings = resolve_think(requested, ctx)
    text = BOS + (THINK_MAX_PREFIX if mode == "max" else "") + (system or "")
    return RenderedPrompt(text, mode, requested, warnings)


def render_user_turn(text: str, think="high") -> str:
    """``<｜User｜>`` + text + the assistant prefix: what a REPL line appends
    (after the previous answer's EOS)."""
    return USER + text + assistant_prefix(think)


def render_prompt(prompt: str, *, system: str | None = DEFAULT_SYSTEM, think="high",
                  ctx: int | None = None) -> RenderedPrompt:
    """A one-shot prompt: transcript start + one user turn (CLI ``-p``)."""
    start = render_transcript_start(system, think=think, ctx=ctx)
    return RenderedPrompt(start.text + render_user_turn(prompt, start.think), start.think,
                          start.requested, start.warnings)


def render_completion(prompt, *, think="high", ctx: int | None = None) -> RenderedPrompt:
    """``/v1/completions``: the prompt (a string, or the first string of an
    array) as one user turn under ``You are a helpful assistant``."""
    if isinstance(prompt, list):
        prompt = next((p for p in prompt if isinstance(p, str)), "")
    if not isinstance(prompt, str):
        raise ValueError("missing prompt")
    return render_prompt(prompt, system=DEFAULT_SYSTEM, think=think, ctx=ctx)


def render_assistant_turn(content: str = "", reasoning: str | None = None, tool_calls=(),
                          *, think="high", raw_dsml: str | None = None) -> str:
    """A finished assistant turn as it follows its prompt (which ends with the
    assistant prefix): ``reasoning</think>`` when thinking, the content, the
    DSML block (``raw_dsml`` verbatim, else canonical) and EOS. This is the
    canonical continuation of §3.6."""
    head = (reasoning or "") + THINK_CLOSE if _norm_think(think) != "none" else ""
    calls = (raw_dsml or render_tool_calls(tool_calls)) if tool_calls else ""
    return head + content + calls + EOS


def set_think_max_prefix(transcript: str, enabled: bool) -> str:
    """Insert or remove the Think Max prefix right after the BOS of a
    rendered transcript (REPL ``/think-max`` and ``/think``)."""
    if not transcript.startswith(BOS):
        raise ValueError("transcript does not start with BOS")
    body = transcript[len(BOS):]
    has = body.startswith(THINK_MAX_PREFIX)
    if enabled and not has:
        body = THINK_MAX_PREFIX + body
    elif not enabled and has:
        body = body[len(THINK_MAX_PREFIX):]
    return BOS + body


def transcript_start_segments(system: str | None = DEFAULT_SYSTEM, *, think="high",
                              ctx: int | None = None) -> list:
    """CLI path: [BOS] + [Think Max prefix text] + [system text]."""
    mode, _ = resolve_think(think, ctx)
    segs = [Segment(BOS, True)]
    if mode == "max":
        segs.append(Segment(THINK_MAX_PREFIX))
    if system:
        segs.append(Segment(system))
    return segs


def user_turn_segments(text: str, think="high") -> list:
    """CLI path: [<｜User｜>] + text + [<｜Assistant｜>] + [<think> | </think>]."""
    return [Segment(USER, True), Segment(text), Segment(ASSISTANT, True),
            Segment(THINK_CLOSE if _norm_think(think) == "none" else THINK_OPEN, True)]


def prompt_segments(prompt: str, *, system: str | None = DEFAULT_SYSTEM, think="high",
                    ctx: int | None = None) -> list:
    """CLI one-shot prompt as segments: special markers are single ids, the
    prompt and system text are plain BPE with no special recognition. Same
    bytes as :func:`render_prompt` (and the same ids as long as the texts hold
    no special-token strings)."""
    mode, _ = resolve_think(think, ctx)
    return (transcript_start_segments(system, think=mode, ctx=ctx)
            + [s for s in user_turn_segments(prompt, mode) if s.special or s.text])


def segments_text(segments) -> str:
    return "".join(s.text for s in segments)


def is_prerendered(text: str) -> bool:
    """A ``-p``/``--prompt-file`` text starting with the literal BOS string is
    a pre-rendered prompt: tokenize it as is, specials recognised."""
    return text.startswith(BOS)
