"""Generation: a prompt's tokens in, sampled text out (streamed as pieces).

The session's KV state is reused for the longest common token prefix with
the new prompt, so a conversation that extends its previous turn only
prefills the new tokens.
"""
from dataclasses import dataclass, field

from .chat import render_chat
from .sampling import Sampler

PREFILL_CHUNK = 512
# greedy tokens fed ahead at once where the backend steps on its own (Stepper)
GREEDY_PIECE = 16


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


class Stepper:
    """Draws a generation's tokens and feeds the accepted ones into the session.

    ``draw(sampler)`` gives the next token, ``accept(tok)`` feeds the one
    drawn, ``settle()`` ends the generation. A token is fed by eval and the
    next one drawn from its logits. With ``device_steps`` (a backend that
    chains steps on its own: CUDA) a token drawn greedily, or by a
    min-p sampler (top_k 0, top_p 1, min_p > 0: the defaults), is fed by
    Session.decode_greedy / decode_sampled instead, which goes on feeding the
    choices that sampler would draw after it, GREEDY_PIECE tokens in one call
    (no more than `max_tokens` draws can take); the next draws by that
    sampler (any greedy one) take those, each setting the sampler's state to
    what drawing it on the host leaves. Where another sampler's draw or the
    end comes first, or a chained draw is drawn again before it is accepted,
    the session goes back to the accepted tokens: its state is always that
    of feeding exactly them, and the tokens and sampler states the same as
    drawing each from eval's logits. A chain cut short that way halves the
    next ones (a tool call's greedy structure and sampled strings take turns
    every few tokens: whole pieces would be fed and dropped at each turn),
    and a chain drawn to its end doubles them again, up to GREEDY_PIECE."""

    def __init__(self, session, logits, *, device_steps=False, max_tokens=None):
        self.session, self.logits = session, logits
        self.device_steps = device_steps
        self.left = max_tokens   # draws still to come (None: no limit)
        self.ahead = []      # the chain's choices fed past the accepted tokens
        self.next = None     # its choice after the last token fed
        self.chain = None    # the sampler whose draws they are (None: greedy choices)
        self.states = []     # its state after each of ahead + [next]
        self.drawn_fed = False
        self.drawn_by = None
        self.drawn_from_chain = False   # a sampled chain's draw, not yet accepted
        self.length = GREEDY_PIECE   # the next chain's tokens (at most GREEDY_PIECE)
        self.ran_out = False         # the chain's last choice drawn: it ran whole

    def _chain_draws_for(self, sampler):
        if not (self.ahead or self.next is not None):
            return False
        if sampler.greedy:
            return self.chain is None
        return self.chain is sampler and not self.drawn_from_chain

    def draw(self, sampler):
        if self.left is not None:
            self.left -= 1
        self.drawn_by = sampler
        if self._chain_draws_for(sampler):
            self.drawn_fed = bool(self.ahead)
            if self.chain is not None:
                sampler.state = self.states[0]
                self.drawn_from_chain = True
            self.ran_out = not self.ahead
            return self.ahead[0] if self.ahead else self.next
        self._back_to_accepted()
        self.drawn_fed = False
        return sampler.sample(self.logits)

    def accept(self, tok):
        sampler, self.drawn_from_chain = self.drawn_by, False
        if self.drawn_fed:
            self.ahead.pop(0)
            if self.chain is not None:
                self.states.pop(0)
            if not self.ahead:   # every token fed is accepted: the session's last logits are the draws'
                self.logits = self.session.logits
            self.drawn_fed = False
        elif self.device_steps and (sampler.greedy or sampler.min_p_only):
            # tok, then as many choices as later draws can take (each of them
            # is fed when accepted, the last one too)
            if self.ran_out:
                self.length, self.ran_out = self.length * 2, False
            self.length = min(self.length, GREEDY_PIECE)
            k = min(self.length, self.session.ctx - self.session.n_tokens)
            if self.left is not None:
                k = min(k, self.left + 1)
            if sampler.greedy:
                choices, self.chain, self.states = self.session.decode_greedy(tok, max(1, k)), None, []
            else:
                before = sampler.state   # none of the chain's draws is drawn yet
                choices, self.states = self.session.decode_sampled(tok, max(1, k), sampler)
                sampler.state, self.chain = before, sampler
            self.ahead, self.next = choices[:-1], choices[-1]
            self.logits = None if self.ahead else self.session.logits
        else:
            self._drop_chain()
            self.logits = self.session.eval([tok])

    def settle(self):
        """Drops the chained tokens fed past the accepted ones."""
        if self.ahead:
            self.session.rewind(self.session.n_tokens - len(self.ahead))
            self.logits = None
        self._drop_chain()

    def _drop_chain(self):
        self.ahead, self.next, self.chain, self.states = [], None, None, []
        self.drawn_from_chain = self.ran_out = False

    def _back_to_accepted(self):
        """Before a draw the chain does not make: the accepted tokens' logits
        (the last of them evaluated again where chained tokens were fed past
        it)."""
        if self.ahead:
            self.length = max(1, self.length // 2)   # cut short: shorter chains
            n = self.session.n_tokens - len(self.ahead)
            last = self.session.tokens[n - 1]
            self.session.rewind(n - 1)
            self.logits = self.session.eval([last])
        self._drop_chain()


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
           stop=None, result=None, progress=None, device_steps=None):
    """Yields Pieces of the continuation of `ids`; fills `result` (a Generation).
    device_steps: greedy tokens by the backend's own steps (Stepper); by default
    where the backend has them (CUDA)."""
    if device_steps is None:
        device_steps = getattr(session.model, "backend", "cpu") == "cuda"
    result = result if result is not None else Generation()
    sampler = sampler or Sampler()
    logits, result.prefilled_tokens = prefill(session, ids, progress)
    result.prompt_tokens = len(ids)
    steps = Stepper(session, logits, device_steps=device_steps, max_tokens=max_tokens)
    try:
        yield from _continue(steps, tokenizer, max_tokens, sampler, thinking, stop, result)
    finally:
        steps.settle()


def _continue(steps, tokenizer, max_tokens, sampler, thinking, stop, result):
    kind = "reasoning" if thinking else "answer"
    decoder = tokenizer.stream_decoder()
    stops = StopMatcher(stop)
    pending = None
    for _ in range(max_tokens):
        if pending is not None:
            steps.accept(pending)
            pending = None
        tok = steps.draw(sampler)
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
        pending = tok
    if pending is not None:
        steps.accept(pending)   # the last token joins the state, as every one before it
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
