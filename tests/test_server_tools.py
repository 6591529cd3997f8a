"""Tool calls through the server: DSML out, protocol objects in each API, and
stateless agent loops whose second turn prefills only the new tokens."""
import json
import re

from test_server_support import EOS, harness, tiny_tokenizer  # noqa: F401

USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
D = "｜DSML｜"
# what the model writes for one call (spec §3.2 example), cut into pieces the
# way a sampler may cut it, so the sampled ids are not the canonical ones
CALL_PIECES = ["Need ls.</think>Listing", " now.", "\n\n<", f"{D}tool", "_calls>\n",
               f'<{D}invoke name="bash">\n',
               f'<{D}parameter name="command" string="true">ls -la &amp;& pwd</{D}parameter>\n',
               f'<{D}parameter name="timeout" string="false">10</{D}parameter>\n',
               f"</{D}invoke>\n</{D}tool_calls>"]
ARGS = {"command": "ls -la && pwd", "timeout": 10}
BASH_OPENAI = {"type": "function", "function": {
    "name": "bash", "description": "Run a shell command",
    "parameters": {"type": "object", "properties": {"command": {"type": "string"},
                                                    "timeout": {"type": "number"}},
                   "required": ["command"]}}}
BASH_ANTHROPIC = {"name": "bash", "description": "Run a shell command",
                  "input_schema": BASH_OPENAI["function"]["parameters"]}


def ntok(tok, text):
    return len(tok.encode(text, special=True))


def new_turn_tokens(tok, result):
    """Tokens a tool-result turn adds after the sampled call (spec §2.2 grammar)."""
    return ntok(tok, EOS + USER + "<tool_result>" + result + "</tool_result>" + ASSISTANT
                + "<think>")


def answered_call_items(output, call):
    """The Responses input of turn two: the question, turn one's output items
    as the client returns them, and the tool's result for `call`."""
    items = [{"role": "user", "content": "List files"}]
    items += [o.model_dump(exclude_none=True) for o in output]
    items.append({"type": "function_call_output", "call_id": call.call_id,
                  "output": "a.c\nb.c"})
    return items


def test_openai_tool_loop_streams_calls_and_turn_two_prefills_only_new_tokens(
        harness, tiny_tokenizer):
    client = harness.openai()
    messages = [{"role": "system", "content": "You are a coding agent."},
                {"role": "user", "content": "List files"}]
    harness.engine.script(CALL_PIECES)
    chunks = list(client.chat.completions.create(
        model="deepseek-v4-flash", messages=messages, tools=[BASH_OPENAI], stream=True,
        stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                        for c in chunks if c.choices)
    calls = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            if tc.function.name:
                entry["name"] = tc.function.name
            entry["arguments"] += tc.function.arguments or ""
    assert content == "Listing now." and reasoning == "Need ls."
    assert "DSML" not in content
    assert list(calls) == [0] and calls[0]["name"] == "bash"
    assert re.fullmatch(r"call_[0-9a-f]{32}", calls[0]["id"])
    assert json.loads(calls[0]["arguments"]) == ARGS
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    u1 = chunks[-1].usage

    # turn 2: the client replays everything (as Pi does, reasoning included)
    messages += [{"role": "assistant", "content": content, "reasoning_content": reasoning,
                  "tool_calls": [{"id": calls[0]["id"], "type": "function",
                                  "function": {"name": "bash",
                                               "arguments": json.dumps(ARGS)}}]},
                 {"role": "tool", "tool_call_id": calls[0]["id"], "content": "a.c\nb.c"}]
    harness.engine.script("Two files.</think>There are two files.")
    r = client.chat.completions.create(model="deepseek-v4-flash", messages=messages,
                                       tools=[BASH_OPENAI])
    assert r.choices[0].message.content == "There are two files."
    details = r.usage.prompt_tokens_details
    assert details.cached_tokens == u1.prompt_tokens + u1.completion_tokens
    assert details.cache_write_tokens == new_turn_tokens(tiny_tokenizer, "a.c\nb.c")
    assert harness.engine.eval_log[-1] == details.cache_write_tokens


def test_anthropic_tool_loop_with_tool_use_blocks(harness, tiny_tokenizer):
    client = harness.anthropic()
    messages = [{"role": "user", "content": "List files"}]
    harness.engine.script(CALL_PIECES)
    with client.messages.stream(model="deepseek-v4-flash", max_tokens=1000, tools=[BASH_ANTHROPIC],
                                messages=messages) as stream:
        events = list(stream)
        first = stream.get_final_message()
    deltas = [e.delta.partial_json for e in events
              if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert json.loads("".join(deltas)) == ARGS
    assert [b.type for b in first.content] == ["thinking", "text", "tool_use"]
    use = first.content[2]
    assert use.name == "bash" and use.input == ARGS
    assert re.fullmatch(r"toolu_[0-9a-f]{32}", use.id)
    assert first.stop_reason == "tool_use"

    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                                   for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                               "content": "a.c\nb.c"}]}]
    harness.engine.script("ok</think>Two files.")
    second = client.messages.create(model="deepseek-v4-flash", max_tokens=1000,
                                    tools=[BASH_ANTHROPIC], messages=messages)
    assert second.content[-1].text == "Two files."
    assert second.usage.cache_read_input_tokens == (first.usage.cache_creation_input_tokens
                                                    + first.usage.output_tokens)
    assert second.usage.cache_creation_input_tokens == new_turn_tokens(tiny_tokenizer,
                                                                       "a.c\nb.c")


def test_anthropic_non_streamed_tool_call(harness):
    harness.engine.script(CALL_PIECES)
    m = harness.anthropic().messages.create(
        model="deepseek-v4-flash", max_tokens=1000, tools=[BASH_ANTHROPIC],
        messages=[{"role": "user", "content": "List files"}])
    assert m.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "input", None)) for b in m.content][1:] == [
        ("text", None), ("tool_use", ARGS)]


def test_responses_function_call_loop(harness, tiny_tokenizer):
    client = harness.openai()
    tool = {"type": "function", "name": "bash", "description": "Run a shell command",
            "parameters": BASH_OPENAI["function"]["parameters"]}
    harness.engine.script(CALL_PIECES)
    events = list(client.responses.create(model="deepseek-v4-flash", input="List files",
                                          tools=[tool], stream=True,
                                          reasoning={"summary": "auto"}))
    done = events[-1].response
    kinds = [o.type for o in done.output]
    assert kinds == ["reasoning", "message", "function_call"]
    call = done.output[2]
    assert call.name == "bash" and json.loads(call.arguments) == ARGS
    assert [e.type for e in events if "function_call_arguments" in e.type] == [
        "response.function_call_arguments.delta", "response.function_call_arguments.done"]

    items = answered_call_items(done.output, call)
    harness.engine.script("ok</think>Two files.")
    r = client.responses.create(model="deepseek-v4-flash", input=items, tools=[tool])
    assert r.output_text == "Two files."
    assert r.usage.input_tokens_details.cached_tokens == (done.usage.input_tokens
                                                          + done.usage.output_tokens)
    assert r.usage.input_tokens_details.cache_write_tokens == new_turn_tokens(
        tiny_tokenizer, "a.c\nb.c")


def test_thinking_answer_reused_when_client_drops_the_reasoning(harness, tiny_tokenizer):
    client = harness.openai()
    messages = [{"role": "user", "content": "hi"}]
    harness.engine.script(["Secret", " reasoning.</think>", "Answer", " one."])
    r1 = client.chat.completions.create(model="deepseek-v4-flash", messages=messages)
    messages += [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": "more"}]
    r2 = client.chat.completions.create(model="deepseek-v4-flash", messages=messages)
    assert harness.server.worker.last_source == "thinking-visible"
    assert r2.usage.prompt_tokens_details.cached_tokens == (r1.usage.prompt_tokens
                                                           + r1.usage.completion_tokens)
    assert r2.usage.prompt_tokens_details.cache_write_tokens == ntok(
        tiny_tokenizer, EOS + USER + "more" + ASSISTANT + "<think>")


def test_malformed_dsml_becomes_plain_text(harness):
    text = f"Calling.\n\n<{D}tool_calls>\n<{D}invoke>\n</{D}invoke>\n</{D}tool_calls>"
    harness.engine.script(text)
    r = harness.openai().chat.completions.create(
        model="deepseek-v4-flash", messages=[{"role": "user", "content": "go"}],
        tools=[BASH_OPENAI], extra_body={"thinking": False})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == text


def test_unterminated_tool_call_finishes_with_error(harness):
    harness.engine.script(CALL_PIECES[:6])
    r = harness.openai().chat.completions.create(
        model="deepseek-v4-flash", messages=[{"role": "user", "content": "go"}],
        tools=[BASH_OPENAI])
    assert r.choices[0].finish_reason == "error"


def test_tool_choice_none_renders_no_tools(harness, tiny_tokenizer):
    client = harness.openai()
    harness.engine.script("</think>x")
    with_tools = client.chat.completions.create(
        model="deepseek-v4-flash", messages=[{"role": "user", "content": "go"}],
        tools=[BASH_OPENAI], extra_body={"thinking": False})
    harness.engine.script("</think>x")
    without = client.chat.completions.create(
        model="deepseek-v4-flash", messages=[{"role": "user", "content": "go"}],
        tools=[BASH_OPENAI], tool_choice="none", extra_body={"thinking": False})
    assert without.usage.prompt_tokens == ntok(
        tiny_tokenizer, "<｜begin▁of▁sentence｜>" + USER + "go" + ASSISTANT + "</think>")
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens + 250  # tools block


def test_tool_turn_replayed_without_its_reasoning_still_reuses_the_kv_state(
        harness, tiny_tokenizer):
    """Codex-style Responses replay (no reasoning items: summaries not asked for)."""
    client = harness.openai()
    tool = {"type": "function", "name": "bash", "description": "Run a shell command",
            "parameters": BASH_OPENAI["function"]["parameters"]}
    harness.engine.script(CALL_PIECES)
    first = client.responses.create(model="deepseek-v4-flash", input="List files",
                                    tools=[tool])
    assert [o.type for o in first.output] == ["message", "function_call"]
    call = first.output[1]
    items = answered_call_items(first.output, call)
    harness.engine.script("ok</think>Two files.")
    r = client.responses.create(model="deepseek-v4-flash", input=items, tools=[tool])
    assert harness.server.worker.last_source == "thinking-visible"
    assert r.usage.input_tokens_details.cached_tokens == (first.usage.input_tokens
                                                          + first.usage.output_tokens)
    assert r.usage.input_tokens_details.cache_write_tokens == new_turn_tokens(
        tiny_tokenizer, "a.c\nb.c")


def test_dsml_without_tools_in_the_request_is_reported_whole_at_the_end(harness):
    """The final parser runs for every chat request (§3.1); calls not streamed
    live arrive in one chunk before the finish chunk (§4.6)."""
    harness.engine.script(CALL_PIECES)
    chunks = list(harness.openai().chat.completions.create(
        model="deepseek-v4-flash", messages=[{"role": "user", "content": "go"}], stream=True))
    with_calls = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(with_calls) == 1
    call = with_calls[0].choices[0].delta.tool_calls[0]
    assert call.function.name == "bash" and json.loads(call.function.arguments) == ARGS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_trace_file_logs_request_cache_decision_prompt_generation_and_calls(tiny_tokenizer,
                                                                            tmp_path):
    from ds4.server.trace import Trace
    from test_server_support import start_harness
    trace = Trace(tmp_path / "trace.log")
    h = start_harness(tiny_tokenizer, trace=trace)
    try:
        client = h.openai()
        messages = [{"role": "user", "content": "List files"}]
        h.engine.script(CALL_PIECES)
        first = client.chat.completions.create(model="deepseek-v4-flash", messages=messages,
                                               tools=[BASH_OPENAI])
        h.engine.script("ok</think>Two files.")
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": first.choices[0].message.tool_calls[0].id,
                      "content": "a.c\nb.c"}]
        client.chat.completions.create(model="deepseek-v4-flash", messages=messages,
                                       tools=[BASH_OPENAI])
    finally:
        h.thread.stop()
    log = (tmp_path / "trace.log").read_text()
    blocks = log.split("=== ")[1:]
    assert len(blocks) == 2 and all(" POST /v1/chat/completions\n" in b for b in blocks)
    request = json.loads(blocks[0].split("request: ", 1)[1].split("\n", 1)[0])
    assert request["messages"] == [{"role": "user", "content": "List files"}]
    assert "cache: cold" in blocks[0]
    assert "cache: memory-" in blocks[1] and "is a prefix of the prompt" in blocks[1]
    assert "".join(CALL_PIECES) in blocks[0]      # the generated text, as sampled
    call = first.choices[0].message.tool_calls[0].function
    assert f"--- tool calls\n{call.name}({call.arguments})" in blocks[0]
    assert "Two files." in blocks[1]


def test_trace_names_the_first_mismatch_with_tokens_around_it(tiny_tokenizer):
    from ds4.server.trace import mismatch_window
    live = tiny_tokenizer.encode("the cat sat on the mat today")
    ids = tiny_tokenizer.encode("the cat sat on a hat today")
    at = next(i for i, (a, b) in enumerate(zip(live, ids)) if a != b)
    text = mismatch_window(tiny_tokenizer, live, ids)
    assert text.startswith(f"first mismatch at token {at} (live {len(live)}, prompt {len(ids)})")
    shown_live, shown_prompt = text.splitlines()[1], text.splitlines()[2]
    assert json.dumps(tiny_tokenizer.decode([live[at]])) in shown_live
    assert json.dumps(tiny_tokenizer.decode([ids[at]])) in shown_prompt
