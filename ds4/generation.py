"""Generation: a prompt's tokens in, sampled text out (streamed as pieces).

The session's KV state is reused for the longest common token prefix with
the new prompt, so a conversation that extends its previous turn only
prefills the new tokens.
"""
from dataclasses import dataclass, field

from .chat import render_chat
from .sampling import Sampler

PREFILL_CHUNK = 512


def prefill_step(session):
    """Tokens per eval call of a prefill: the backend's own chunk (2048 on
    CUDA, whose matrix units want long chunks), and at least PREFILL_CHUNK so
    that progress is reported between calls without slowing the CPU."""
    return max(PREFILL_CHUNK, session.prefill_chunk)


class Piece(str):
    """A piece of generated text; `kind` is "reasoning" or "answer"."""

    def __new__(cls, text, kind):
        self = super().__new__(cls, text)
        self.kind = kind
        return self


@dataclass
class Generation:
    text: str = ""                 # the answer
    reasoning: str = ""            # the thinking, when the prompt asked for it
    finish_reason: str = "length"  # "stop" (EOS or a stop sequence) or "length"
    prompt_tokens: int = 0
    prefilled_tokens: int = 0      # prompt tokens actually evaluated (the rest reused)
    completion_tokens: int = 0
    tokens: list = field(default_factory=list)


def segments_to_ids(tokenizer, segments):
    """Special segments become their single id; text is plain BPE (no specials)."""
    ids = []
    for seg in segments:
        if seg.special:
            ids.append(tokenizer.token_to_id(seg.text))
        elif seg.text:
            ids.extend(tokenizer.encode(seg.text, special=False))
    return ids


def common_prefix(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prefill(session, ids, progress=None):
    """Brings the session to exactly `ids`, evaluating only what differs from its
    current tokens. Returns (logits after the last id, tokens evaluated)."""
    keep = common_prefix(session.tokens, ids)
    if keep == len(ids) == session.n_tokens and session.logits is not None:
        return session.logits, 0
    keep = min(keep, len(ids) - 1)          # the last id is evaluated for its logits
    session.rewind(keep)
    todo = ids[keep:]
    logits = None
    step = prefill_step(session)
    for start in range(0, len(todo), step):
        logits = session.eval(todo[start:start + step])
        if progress:
            progress(min(start + step, len(todo)), len(todo))
    return logits, len(todo)


class StopMatcher:
    """Holds back text that could still become a stop sequence."""

    def __init__(self, stops):
        self.stops = [s for s in (stops or []) if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""

    def push(self, text):
        """(text safe to emit, True if a stop sequence ended the output)."""
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        cut = max(0, len(self.buf) - self.hold)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self):
        out, self.buf = self.buf, ""
        return out


def stream(session, tokenizer, ids, *, max_tokens=256, sampler=None, thinking=False,
           stop=None, result=None, progress=None):
    """Yields Pieces of the continuation of `ids`; fills `result` (a Generation)."""
    result = result if result is not None else Generation()
    sampler = sampler or Sampler()
    logits, result.prefilled_tokens = prefill(session, ids, progress)
    result.prompt_tokens = len(ids)
    kind = "reasoning" if thinking else "answer"
    decoder = tokenizer.stream_decoder()
    stops = StopMatcher(stop)
    for _ in range(max_tokens):
        tok = sampler.sample(logits)
        if tok == tokenizer.eos_id or tok < 0:
            result.finish_reason = "stop"
            break
        result.tokens.append(tok)
        result.completion_tokens += 1
        if kind == "reasoning" and tok == tokenizer.think_end_id:
            tail = decoder.flush()
            if tail:
                result.reasoning += tail
                yield Piece(tail, "reasoning")
            kind = "answer"
        else:
            text = decoder.feed(tok)
            if kind == "reasoning":
                if text:
                    result.reasoning += text
                    yield Piece(text, "reasoning")
            else:
                out, stopped = stops.push(text)
                if out:
                    result.text += out
                    yield Piece(out, "answer")
                if stopped:
                    result.finish_reason = "stop"
                    return
        logits = session.eval([tok])
    tail = decoder.flush()
    if kind == "reasoning":
        if tail:
            result.reasoning += tail
            yield Piece(tail, "reasoning")
        return
    out, stopped = stops.push(tail)
    if stopped:
        result.finish_reason = "stop"
    else:
        out += stops.flush()
    if out:
        result.text += out
        yield Piece(out, "answer")


def prompt_ids(tokenizer, prompt_or_messages, *, think="high", system=None, ctx=None):
    """Token ids of a str prompt (one user turn) or a list of messages, rendered
    with the V4 chat template; plus whether the model starts by thinking."""
    if isinstance(prompt_or_messages, str):
        messages = [{"role": "user", "content": prompt_or_messages}]
    else:
        messages = list(prompt_or_messages)
    if system is not None:
        messages = [{"role": "system", "content": system}] + [
            m for m in messages if m.get("role") != "system"]
    rendered = render_chat(messages, think=think, ctx=ctx)
    return tokenizer.encode(rendered.text, special=True), rendered.think != "none"


__all__ = ["Generation", "Piece", "prefill", "prompt_ids", "segments_to_ids", "stream"]
