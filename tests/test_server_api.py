"""ds4 serve through the official openai and anthropic SDKs (scripted engine)."""
import json

import requests
import pytest

from test_server_support import harness, start_harness, tiny_tokenizer  # noqa: F401

BOS = "<｜begin▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"


def ntok(tok, text):
    return len(tok.encode(text, special=True))


def test_models_health_and_unknown_paths(harness):
    models = harness.openai().models.list()
    assert [m.id for m in models.data] == ["deepseek-v4-flash"]
    one = requests.get(harness.url + "/v1/models/deepseek-v4-flash").json()
    assert one["context_length"] == harness.engine.ctx
    other = requests.get(harness.url + "/v1/models/gpt-4")
    assert other.status_code == 404 and other.json()["error"]["message"]
    assert requests.get(harness.url + "/health").json()["status"] == "ok"
    missing = requests.get(harness.url + "/v1/nothing")
    assert missing.status_code == 404
    assert missing.json() == {"error": {"message": "unknown endpoint",
                                        "type": "invalid_request_error"}}


def test_chat_splits_reasoning_from_answer_and_counts_tokens(harness, tiny_tokenizer):
    harness.engine.script("I think.</think>The answer.")
    r = harness.openai().chat.completions.create(
        model="deepseek-v4-flash", messages=[{"role": "user", "content": "hi"}])
    msg = r.choices[0].message
    assert msg.content == "The answer."
    assert msg.reasoning_content == "I think."
    assert r.choices[0].finish_reason == "stop"
    # the spec's grammar for one thinking user turn (§2.2)
    assert r.usage.prompt_tokens == ntok(tiny_tokenizer, BOS + USER + "hi" + ASSISTANT + "<think>")
    assert r.usage.completion_tokens == ntok(tiny_tokenizer, "I think.</think>The answer.")
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_stream_deltas_rebuild_the_message(harness, tiny_tokenizer):
    text = "Let me see.</think>Streaming works fine."
    harness.engine.script(text)
    chunks = list(harness.openai().chat.completions.create(
        model="deepseek-v4-flash", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                        for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (reasoning, content) == ("Let me see.", "Streaming works fine.")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ntok(
        tiny_tokenizer, text)


def test_non_thinking_request_prompt_and_answer(harness, tiny_tokenizer):
    harness.engine.script("Plain answer")
    r = harness.openai().chat.completions.create(
        model="deepseek-v4-flash", messages=[{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "hi"}],
        extra_body={"thinking": {"type": "disabled"}}, temperature=0)
    assert r.choices[0].message.content == "Plain answer"
    assert getattr(r.choices[0].message, "reasoning_content", None) is None
    assert r.usage.prompt_tokens == ntok(
        tiny_tokenizer, BOS + "Be brief." + USER + "hi" + ASSISTANT + "</think>")


def test_max_tokens_ends_with_length(harness):
    harness.engine.script("</think>one two three four five six seven")
    r = harness.openai().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "count"}], max_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3
    assert r.model == "m"     # echoed verbatim


def test_stop_sequence_cuts_the_answer(harness):
    harness.engine.script("</think>one two three")
    r = harness.openai().chat.completions.create(
        model="deepseek-v4-flash", messages=[{"role": "user", "content": "count"}],
        stop=["two"])
    assert r.choices[0].message.content == "one "
    assert r.choices[0].finish_reason == "stop"


def test_completions_return_the_raw_text(harness, tiny_tokenizer):
    client = harness.openai()
    harness.engine.script("hm</think>Paris")
    r = client.completions.create(model="deepseek-v4-flash", prompt="Capital of France?")
    assert r.choices[0].text == "hm</think>Paris"
    assert r.usage.prompt_tokens == ntok(
        tiny_tokenizer, BOS + "You are a helpful assistant" + USER + "Capital of France?"
        + ASSISTANT + "<think>")
    harness.engine.script("hm</think>Paris")
    pieces = [c.choices[0].text for c in client.completions.create(
        model="deepseek-v4-flash", prompt="Capital of France?", stream=True)]
    assert "".join(pieces) == "hm</think>Paris"


def test_responses_api_with_reasoning_summary(harness):
    client = harness.openai()
    harness.engine.script("Reason.</think>Answer text.")
    r = client.responses.create(model="deepseek-v4-flash", input="hi",
                                reasoning={"effort": "high", "summary": "auto"})
    assert r.status == "completed"
    assert r.output_text == "Answer text."
    assert r.output[0].type == "reasoning" and r.output[0].summary[0].text == "Reason."
    assert r.usage.output_tokens > 0

    harness.engine.script("Reason.</think>Answer text.")
    events = list(client.responses.create(model="deepseek-v4-flash", input="hi", stream=True,
                                          reasoning={"summary": "auto"}))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    summary = "".join(e.delta for e in events
                      if e.type == "response.reasoning_summary_text.delta")
    assert (summary, text) == ("Reason.", "Answer text.")
    assert events[-1].response.output[1].content[0].text == "Answer text."


def test_responses_without_summary_hide_reasoning(harness):
    harness.engine.script("secret.</think>Shown.")
    r = harness.openai().responses.create(
        model="deepseek-v4-flash", instructions="Be nice.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}])
    assert [o.type for o in r.output] == ["message"]
    assert r.output_text == "Shown."


def test_anthropic_messages_plain_and_streamed(harness):
    client = harness.anthropic()
    harness.engine.script("Hmm.</think>Hello from ds4")
    m = client.messages.create(model="deepseek-v4-flash", max_tokens=100,
                               system="You are terse.",
                               messages=[{"role": "user", "content": "hi"}])
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == "Hmm." and m.content[1].text == "Hello from ds4"
    assert m.stop_reason == "end_turn"
    assert m.usage.cache_creation_input_tokens > 0 and m.usage.output_tokens > 0

    harness.engine.script("Hmm.</think>Hello from ds4")
    with client.messages.stream(model="deepseek-v4-flash", max_tokens=100, system="You are terse.",
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[1].text == "Hello from ds4"
    assert final.content[0].signature == final.id
    # same prompt again: everything but the last prompt token is reused
    assert final.usage.cache_read_input_tokens == m.usage.cache_creation_input_tokens - 1


def test_anthropic_max_tokens_reason(harness):
    harness.engine.script("</think>a b c d e f g h")
    m = harness.anthropic().messages.create(
        model="deepseek-v4-flash", max_tokens=2, thinking={"type": "disabled"},
        messages=[{"role": "user", "content": "go"}])
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 2


def test_api_key_is_enforced_in_both_families(tiny_tokenizer):
    import anthropic
    import openai
    h = start_harness(tiny_tokenizer, api_key="sekrit")
    try:
        with pytest.raises(openai.AuthenticationError):
            h.openai(api_key="wrong").models.list()
        with pytest.raises(anthropic.AuthenticationError):
            h.anthropic(api_key="wrong").messages.create(
                model="x", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        bare = requests.post(h.url + "/v1/messages", json={})
        assert bare.status_code == 401 and bare.json()["type"] == "error"
        assert h.openai(api_key="sekrit").models.list().data[0].id == "deepseek-v4-flash"
        m = h.anthropic(api_key="sekrit").messages.create(
            model="x", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert m.content[-1].type == "text"
        assert requests.get(h.url + "/health").status_code == 200
    finally:
        h.thread.stop()


def test_cors_headers_and_preflight(tiny_tokenizer):
    h = start_harness(tiny_tokenizer, cors=True)
    try:
        pre = requests.options(h.url + "/v1/chat/completions")
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == "*"
        r = requests.get(h.url + "/v1/models")
        assert r.headers["access-control-allow-methods"] == "GET, POST, OPTIONS"
    finally:
        h.thread.stop()
    plain = start_harness(tiny_tokenizer)
    try:
        assert "access-control-allow-origin" not in requests.get(plain.url + "/v1/models").headers
    finally:
        plain.thread.stop()


def test_prompt_longer_than_context_is_a_400(tiny_tokenizer):
    h = start_harness(tiny_tokenizer, ctx=32)
    try:
        long = "word " * 100
        r = h.post("/v1/chat/completions", {"messages": [{"role": "user", "content": long}]})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and err["n_ctx"] == 32
        a = h.post("/v1/messages", {"max_tokens": 5,
                                    "messages": [{"role": "user", "content": long}]})
        assert a.status_code == 400 and a.json()["type"] == "error"
        assert a.json()["error"]["n_prompt_tokens"] > 32
    finally:
        h.thread.stop()


def test_keepalive_comments_during_a_long_prefill(tiny_tokenizer):
    h = start_harness(tiny_tokenizer, keepalive=0.05, engine_kw={"prefill_delay": 0.02})
    try:
        h.engine.script("</think>done")
        body = {"messages": [{"role": "user", "content": "x " * 40}], "stream": True}
        with requests.post(h.url + "/v1/chat/completions", json=body, timeout=30,
                           stream=True) as r:
            raw = b"".join(r.iter_content(None)).decode()
        first_data = raw.index("data:")
        assert ": prefill\n\n" in raw[:first_data]
        payloads = [json.loads(line[6:]) for line in raw.splitlines()
                    if line.startswith("data: {")]
        assert "".join(p["choices"][0]["delta"].get("content", "")
                       for p in payloads if p["choices"]) == "done"
        assert raw.rstrip().endswith("data: [DONE]")
    finally:
        h.thread.stop()


def test_anthropic_stop_sequence_is_reported(harness):
    client = harness.anthropic()
    harness.engine.script("</think>alpha END beta")
    m = client.messages.create(model="deepseek-v4-flash", max_tokens=50,
                               thinking={"type": "disabled"}, stop_sequences=["END"],
                               messages=[{"role": "user", "content": "go"}])
    assert (m.stop_reason, m.stop_sequence, m.content[0].text) == ("stop_sequence", "END",
                                                                   "alpha ")
    harness.engine.script("</think>alpha END beta")
    with client.messages.stream(model="deepseek-v4-flash", max_tokens=50,
                                thinking={"type": "disabled"}, stop_sequences=["END"],
                                messages=[{"role": "user", "content": "go"}]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "END")


def test_model_aliases_and_effort_select_the_thinking_mode(harness, tiny_tokenizer):
    client = harness.openai()
    plain = ntok(tiny_tokenizer, BOS + USER + "hi" + ASSISTANT + "</think>")
    thinking = ntok(tiny_tokenizer, BOS + USER + "hi" + ASSISTANT + "<think>")
    cases = [({"model": "deepseek-chat"}, plain),
             ({"model": "deepseek-reasoner"}, thinking),
             ({"model": "deepseek-chat", "extra_body": {"thinking": True}}, thinking),
             ({"model": "x", "reasoning_effort": "none"}, plain),
             # Think Max needs ctx >= 393216; this server has 8192, so plain thinking
             ({"model": "x", "reasoning_effort": "max"}, thinking)]
    for kw, expected in cases:
        harness.engine.script("</think>ok")
        r = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kw)
        assert r.usage.prompt_tokens == expected, kw


def test_anthropic_count_tokens(harness, tiny_tokenizer):
    n = harness.anthropic().messages.count_tokens(
        model="deepseek-v4-flash", system="You are terse.",
        messages=[{"role": "user", "content": "hi"}])
    assert n.input_tokens == ntok(tiny_tokenizer,
                                  BOS + "You are terse." + USER + "hi" + ASSISTANT + "<think>")
    assert harness.engine.eval_log == []        # counting never reaches the worker
