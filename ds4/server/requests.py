"""Request validation shared by the four POST endpoints (prompt-and-server.md §4.3).

Every shape error becomes an :class:`ApiError` (status + one-line message);
the app turns it into each API family's JSON error body. Unknown top-level
fields are ignored, as the spec and the official APIs do.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..chat import think_from_request
from .engine import MODEL_ID, SamplingParams

DEFAULT_MAX_TOKENS = 393_216
MAX_JSON_DEPTH = 256


class ApiError(Exception):
    def __init__(self, status, message, *, kind="invalid_request_error", extra=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.extra = extra or {}


def bad(message="invalid JSON request", **kw):
    return ApiError(400, message, **kw)


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object (400 otherwise)."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad() from None
    if not isinstance(body, dict):
        raise bad()
    if _depth(body) > MAX_JSON_DEPTH:
        raise bad()
    return body


def _depth(value):
    depth, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            depth = max(depth, d)
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            depth = max(depth, d)
            stack.extend((x, d + 1) for x in v)
    return depth


def raw_member(raw: bytes, key: str):
    """The exact JSON text of a top-level member (tool schemas keep the
    client's bytes, §2.5), or None."""
    from ..chat import raw_json_members
    try:
        members = raw_json_members(raw.decode("utf-8"))
    except (UnicodeDecodeError, IndexError):
        return None
    for k, v in members or ():
        if k == key:
            return v
    return None


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def opt(body, key, check, what):
    """body[key] if present and not null, after a type check (400 naming the field)."""
    v = body.get(key)
    if v is None:
        return None
    if not check(v):
        raise bad(f"invalid JSON request: {key} must be {what}")
    return v


def number(body, key):
    return opt(body, key, _is_num, "a number")


def integer(body, key):
    return opt(body, key, _is_int, "an integer")


def boolean(body, key):
    return opt(body, key, lambda v: isinstance(v, bool), "a boolean")


def string(body, key):
    return opt(body, key, lambda v: isinstance(v, str), "a string")


def obj(body, key):
    return opt(body, key, lambda v: isinstance(v, dict), "an object")


def array(body, key):
    return opt(body, key, lambda v: isinstance(v, list), "an array")


def stop_list(body, key="stop"):
    v = body.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v else []
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return [s for s in v if s]
    raise bad(f"invalid JSON request: {key} must be a string or an array of strings")


def max_tokens(body, *keys, required=False):
    for key in keys:
        v = integer(body, key)
        if v is not None:
            return max(0, v)
    if required:
        raise bad(f"{keys[0]}: field required")
    return DEFAULT_MAX_TOKENS


def sampling(body, *, think, top_k=True, min_p=True, seed=True):
    """Sampling parameters; in thinking mode the client's are ignored (§4.3)."""
    t = number(body, "temperature")
    p = number(body, "top_p")
    k = integer(body, "top_k") if top_k else None
    m = number(body, "min_p") if min_p else None
    s = number(body, "seed") if seed else None
    if think != "none":
        return SamplingParams()
    out = SamplingParams()
    if t is not None:
        out.temperature = float(t)
    if p is not None:
        out.top_p = float(p)
    if k is not None:
        out.top_k = max(0, k)
    if m is not None:
        out.min_p = float(m)
    if s is not None and s > 0:
        out.seed = int(s)
    return out


def think_mode(body, api):
    try:
        return think_from_request(body, api)
    except ValueError as exc:
        raise bad(str(exc)) from None


def messages_list(body, key="messages"):
    msgs = body.get(key)
    if msgs is None:
        raise bad(f"missing {key}")
    if not isinstance(msgs, list):
        raise bad(f"invalid JSON request: {key} must be an array")
    if not msgs:
        raise bad(f"invalid JSON request: {key} must not be empty")
    for m in msgs:
        if not isinstance(m, dict):
            raise bad(f"invalid JSON request: each of {key} must be an object")
        role = m.get("role")
        if role is not None and not isinstance(role, str):
            raise bad("invalid JSON request: role must be a string")
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list)):
            raise bad("invalid JSON request: content must be a string or an array")
        if isinstance(c, list) and not all(isinstance(x, (str, dict)) for x in c):
            raise bad("invalid JSON request: content parts must be strings or objects")
    return msgs


def tools_list(body):
    tools = array(body, "tools")
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise bad("invalid JSON request: tools must be objects")
    return tools or None


@dataclass
class Prepared:
    """A validated, rendered request, ready for the worker."""
    model: str
    text: str
    ids: list
    think: str
    tools: bool
    max_tokens: int
    params: SamplingParams
    stop: list
    stream: bool
    include_usage: bool = False
    keeps_reasoning: bool = False   # rendered with earlier reasoning kept (tool context)
    extra: dict = field(default_factory=dict)

    @property
    def thinking(self):
        return self.think != "none"


def model_name(body):
    return string(body, "model") or MODEL_ID


def context_error(n, ctx, param, anthropic=False):
    msg = f"Prompt has {n} tokens, but the configured context size is {ctx} tokens"
    if anthropic:
        return ApiError(400, msg, extra={"n_prompt_tokens": n, "n_ctx": ctx})
    return ApiError(400, msg, extra={"param": param, "code": "context_length_exceeded",
                                     "n_prompt_tokens": n, "n_ctx": ctx})


def dumps_compact(value):
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
