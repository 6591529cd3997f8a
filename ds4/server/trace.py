"""`ds4 serve --trace FILE`: a human-readable log of every request, for finding
out why an agent's turn was not reused or what the model was really shown.

Each request adds one block: the endpoint and raw JSON, the cache decision with
the tokens around the first mismatch between the live KV state and the new
prompt, the rendered prompt, the generated text and the tool calls parsed from
it. Written by the worker thread only, flushed per block.
"""
import json
import threading
import time

WINDOW = 8   # tokens shown on each side of the first mismatch


def mismatch_window(tokenizer, live, ids):
    """Where the live tokens and the prompt part, with a few tokens around it."""
    n = min(len(live), len(ids))
    at = next((i for i in range(n) if live[i] != ids[i]), n)
    if at == len(live):
        return f"live state ({len(live)} tokens) is a prefix of the prompt"
    lo = max(0, at - WINDOW)
    show = lambda toks: " ".join(json.dumps(tokenizer.decode([t]), ensure_ascii=False)
                                 for t in toks[lo:at + WINDOW])
    return (f"first mismatch at token {at} (live {len(live)}, prompt {len(ids)}):\n"
            f"  live:   {show(live)}\n  prompt: {show(ids)}")


class Trace:
    def __init__(self, path):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def close(self):
        with self._lock:
            self._f.close()

    def write(self, job, *, cache, generated, finish, completion_tokens, parsed):
        lines = [f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} POST {job.endpoint or '?'}",
                 "request: " + (job.request or ""),
                 cache,
                 "--- rendered prompt", job.text,
                 f"--- generated ({completion_tokens} tokens, finish {finish})", generated]
        if parsed is not None and parsed.tool_calls:
            lines.append("--- tool calls")
            lines += [f"{c.name}({c.arguments})" for c in parsed.tool_calls]
        with self._lock:
            if not self._f.closed:
                self._f.write("\n".join(lines) + "\n\n")
                self._f.flush()
