"""Server overhead and queueing, measured with the scripted engine.

    python -m ds4.server.bench MODEL.gguf [--requests 200] [--clients 8] [--real]

MODEL provides the tokenizer. Reports (1) the round trip of a 1-token reply
per API (everything but inference: HTTP, validation, rendering,
tokenization, the worker hop and the response), and (2) how concurrent
clients queue on the single worker when each reply takes a fixed time.
``--real`` adds (3): the same 1-token chat request on the real engine over
HTTP against the engine called directly (same prompt, KV state reused).
"""
import argparse
import statistics
import threading
import time

import requests


def _percentiles(xs):
    xs = sorted(xs)
    return (statistics.median(xs) * 1e3, xs[int(0.9 * (len(xs) - 1))] * 1e3,
            xs[-1] * 1e3)


def round_trips(url, engine, n):
    bodies = {
        "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                          "thinking": False}),
        "chat stream": ("/v1/chat/completions", {"messages": [{"role": "user",
                                                               "content": "hi"}],
                                                 "thinking": False, "stream": True}),
        "messages": ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 8, "thinking": {"type": "disabled"}}),
        "responses": ("/v1/responses", {"input": "hi", "reasoning": {"effort": "none"}}),
    }
    http = requests.Session()
    for name, (path, body) in bodies.items():
        times = []
        for i in range(n + 5):
            engine.script("x")
            t0 = time.perf_counter()
            r = http.post(url + path, json=body)
            r.content
            if i >= 5:               # warm-up excluded
                times.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
        med, p90, worst = _percentiles(times)
        print(f"1-token round trip  {name:12s} median {med:6.2f} ms  p90 {p90:6.2f} ms  "
              f"max {worst:6.2f} ms  (n={n})")


def queueing(url, engine, clients, per_client, reply_tokens, token_delay):
    engine.token_delay = token_delay
    engine.default = " a" * reply_tokens
    waits, lock = [], threading.Lock()

    def client():
        http = requests.Session()
        for _ in range(per_client):
            t0 = time.perf_counter()
            r = http.post(url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "hi"}],
                                "thinking": False})
            assert r.status_code == 200, r.text
            with lock:
                waits.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    service = (reply_tokens + 1) * token_delay
    n = clients * per_client
    med, p90, worst = _percentiles(waits)
    print(f"queueing: {clients} clients x {per_client} requests, {service * 1e3:.0f} ms of "
          f"'inference' each: {n / wall:.1f} req/s (ideal {1 / service:.1f}), worker busy "
          f"{n * service / wall * 100:.0f}% of {wall:.1f} s; latency median {med:.0f} ms, "
          f"p90 {p90:.0f} ms, max {worst:.0f} ms (ideal median {clients * service * 1e3:.0f})")


def real_engine(path, n):
    import ds4
    from . import ModelEngine, Server, ServerThread
    from .engine import SamplingParams
    model = ds4.load(path, ctx=4096)
    engine = ModelEngine(model)
    body = {"messages": [{"role": "user", "content": "hi"}], "thinking": False,
            "max_tokens": 1, "temperature": 0}
    ids = model.tokenizer.encode(
        "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜></think>", special=True)
    direct = []
    for i in range(n + 5):
        t0 = time.perf_counter()
        engine.prefill(ids)        # re-evaluates the last prompt token, as the server does
        engine.limit(1)
        engine.accept(engine.next_token(engine.sampler(SamplingParams(temperature=0))))
        if i >= 5:
            direct.append(time.perf_counter() - t0)
    http_times = []
    with ServerThread(Server(engine)) as st:
        http = requests.Session()
        for i in range(n + 5):
            t0 = time.perf_counter()
            r = http.post(st.url + "/v1/chat/completions", json=body)
            r.content
            if i >= 5:
                http_times.append(time.perf_counter() - t0)
    d, h = statistics.median(direct) * 1e3, statistics.median(http_times) * 1e3
    print(f"real engine, 1-token chat: direct {d:.2f} ms, over HTTP {h:.2f} ms median "
          f"(server overhead {h - d:.2f} ms)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--real", action="store_true")
    args = ap.parse_args()
    import ds4
    from . import ScriptedEngine, Server, ServerThread
    with ds4.load(args.model, ctx=4096) as m:
        tokenizer = m.tokenizer
    engine = ScriptedEngine(tokenizer, ctx=8192)
    server = Server(engine, max_queue=args.clients * 2)
    with ServerThread(server) as st:
        round_trips(st.url, engine, args.requests)
        queueing(st.url, engine, args.clients, 10, reply_tokens=10, token_delay=0.002)
    if args.real:
        real_engine(args.model, min(args.requests, 50))


if __name__ == "__main__":
    main()
