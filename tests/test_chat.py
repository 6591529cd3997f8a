"""ds4.chat: the V4 chat template.

The oracle is prompt-and-server.md: the exact bytes, token ids, byte lengths,
token counts and SHA-256 prefixes quoted in §2.1/§2.4/§2.5, tokenized with the
real V4 tokenizer (HF `tokenizers`, `add_special_tokens=False`).
"""
import hashlib
import os
from pathlib import Path

import pytest

from ds4 import chat
from ds4.chat import (ASSISTANT, BOS, EOS, THINK_MAX_PREFIX, USER, render_chat)
from ds4.dsml import ToolReplayMemory

REPO = Path(__file__).resolve().parent.parent
# The official test-vector prompts (prompt-and-server.md §8) are not part of this
# repository; point DS4_TEST_VECTORS at a folder of them to run those tests.
VECTOR_PROMPTS = Path(os.environ.get("DS4_TEST_VECTORS",
                                     REPO.parent / "shared" / "test-vectors" / "prompts"))


@pytest.fixture(scope="module")
def tok():
    tokenizers = pytest.importorskip("tokenizers")
    from ds4.tokenizer import reference_tokenizer_json_path
    return tokenizers.Tokenizer.from_file(reference_tokenizer_json_path())


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def measure(tok, text):
    """(UTF-8 bytes, HF token count, first 16 hex of SHA-256), as §2.4 quotes."""
    b = text.encode("utf-8")
    return len(b), len(ids(tok, text)), hashlib.sha256(b).hexdigest()[:16]


TERSE = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}]

BASH_SCHEMA = ('{"name":"bash","description":"Run a shell command","parameters":{"type":"object",'
               '"properties":{"command":{"type":"string"},"timeout":{"type":"number"}},'
               '"required":["command"]}}')

# §2.5, the tools block with <SCHEMA LINES> as a placeholder.
SPEC_TOOLS_BLOCK = """## Tools

You have access to a set of tools to help answer the user question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as raw text and set `string="true"`. Preserve characters such as `>`, `&`, and `&&` exactly; never replace normal string characters with XML or HTML entity escapes. Only if a string value itself contains the exact closing parameter tag `</｜DSML｜parameter>`, write that tag as `&lt;/｜DSML｜parameter>` inside the value. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

<SCHEMA LINES>

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls. Use the exact parameter names from the schemas."""


def example_e_messages():
    return [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": "List files"},
        {"role": "assistant", "reasoning_content": "Need ls.", "content": "",
         "tool_calls": [{"id": "call_1", "type": "function", "function": {
             "name": "bash", "arguments": '{"command":"ls -la","timeout":10}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a.c\nb.c"},
    ]


def example_f_messages():
    return [
        {"role": "user", "content": "Read both"},
        {"role": "assistant", "content": "Reading.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "read", "arguments": '{"path":"a.c"}'}},
            {"id": "c2", "type": "function", "function": {
                "name": "read", "arguments": '{"path": "b.c", "lines": [1, 2]}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "A"},
        {"role": "tool", "tool_call_id": "c2", "content": "B </tool_result> end"},
        {"role": "user", "content": "Now summarize"},
    ]


# ---------------------------------------------------------------------------
# §2.4 worked examples, byte-exact

def test_example_a_non_thinking_bytes_ids_and_hash(tok):
    p = render_chat(TERSE, think="none")
    assert p.text == "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Hello<｜Assistant｜></think>"
    assert ids(tok, p.text) == [0, 3476, 477, 259, 10935, 16, 128803, 19923, 128804, 128822]
    assert measure(tok, p.text) == (85, 10, "9ef90a0623f1f965")
    assert p.think == "none" and p.warnings == ()


def test_example_b_thinking_bytes_ids_and_hash(tok):
    p = render_chat(TERSE, think="high")
    assert p.text == "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Hello<｜Assistant｜><think>"
    assert ids(tok, p.text) == [0, 3476, 477, 259, 10935, 16, 128803, 19923, 128804, 128821]
    assert measure(tok, p.text) == (84, 10, "c4bc0f226756fe34")


def test_example_c_think_max_prefix_after_bos_when_ctx_allows(tok):
    p = render_chat(TERSE, think="max", ctx=393_216)
    assert p.text == BOS + THINK_MAX_PREFIX + "You are terse.<｜User｜>Hello<｜Assistant｜><think>"
    assert measure(tok, p.text) == (560, 89, "d01507501f67808e")
    assert p.think == "max" and p.warnings == ()


def test_think_max_prefix_is_three_lines_and_a_blank_line_of_79_tokens(tok):
    lines = THINK_MAX_PREFIX.split("\n")
    assert len(lines) == 5 and lines[3:] == ["", ""]
    assert lines[0] == "Reasoning Effort: Absolute maximum with no shortcuts permitted."
    assert len(ids(tok, THINK_MAX_PREFIX)) == 79


@pytest.mark.parametrize("ctx", [None, 0, 32768, 393_215])
def test_think_max_below_393216_context_falls_back_to_high_with_a_warning(ctx):
    p = render_chat(TERSE, think="max", ctx=ctx)
    assert p.text == render_chat(TERSE, think="high").text
    assert p.think == "high" and p.requested == "max"
    assert len(p.warnings) == 1 and "393216" in p.warnings[0]


def test_example_d_multi_turn_thinking_drops_old_reasoning(tok):
    msgs = [{"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "reasoning_content": "Simple.", "content": "4."},
            {"role": "user", "content": "And 3+3?"}]
    p = render_chat(msgs, think="high")
    assert p.text == ("<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜></think>4."
                      "<｜end▁of▁sentence｜><｜User｜>And 3+3?<｜Assistant｜><think>")
    assert ids(tok, p.text) == [0, 128803, 3085, 344, 223, 20, 13, 20, 33, 128804, 128822, 22, 16,
                                1, 128803, 4195, 223, 21, 13, 21, 33, 128804, 128821]
    assert measure(tok, p.text) == (151, 23, "192b802fa2e8fe37")
    assert not p.tool_context


def test_example_e_thinking_with_tools_keeps_reasoning_and_renders_canonical_dsml(tok):
    tools = ['{"type":"function","function":' + BASH_SCHEMA + '}']
    p = render_chat(example_e_messages(), tools=tools, think="high")
    block = SPEC_TOOLS_BLOCK.replace("<SCHEMA LINES>", BASH_SCHEMA)
    assert p.text == (BOS + block + "\n\nYou are a coding agent.<｜User｜>List files<｜Assistant｜>"
                      "<think>Need ls.</think>\n\n<｜DSML｜tool_calls>\n"
                      '<｜DSML｜invoke name="bash">\n'
                      '<｜DSML｜parameter name="command" string="true">ls -la</｜DSML｜parameter>\n'
                      '<｜DSML｜parameter name="timeout" string="false">10</｜DSML｜parameter>\n'
                      "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
                      "<｜User｜><tool_result>a.c\nb.c</tool_result><｜Assistant｜><think>")
    assert measure(tok, p.text) == (1972, 429, "a16bab4d27183bd4")
    # "the prefix up to the first <think>": through the first assistant's <think>
    # (the tools block itself mentions <think> as text earlier).
    cut = p.text.index(ASSISTANT + "<think>") + len(ASSISTANT + "<think>")
    assert measure(tok, p.text[:cut]) == (1605, 347, "e453598217eb8f81")
    assert p.tool_context


def test_example_f_tool_history_escapes_results_and_reminifies_json(tok):
    p = render_chat(example_f_messages(), think="none")
    assert p.text == (
        "<｜begin▁of▁sentence｜><｜User｜>Read both<｜Assistant｜></think>Reading.\n\n"
        "<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="read">\n'
        '<｜DSML｜parameter name="path" string="true">a.c</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="read">\n'
        '<｜DSML｜parameter name="path" string="true">b.c</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="lines" string="false">[1,2]</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        "</｜DSML｜tool_calls><｜end▁of▁sentence｜><｜User｜><tool_result>A</tool_result>"
        "<tool_result>B &lt;/tool_result> end</tool_result><｜User｜>Now summarize"
        "<｜Assistant｜></think>")
    assert measure(tok, p.text) == (623, 130, "2d9534c5a5c96f16")


def test_example_g_anthropic_request_flattens_blocks():
    msgs = chat.messages_from_anthropic(
        [{"role": "user", "content": "hi"},
         {"role": "assistant", "content": [
             {"type": "thinking", "thinking": "plan", "signature": "sig"},
             {"type": "text", "text": "ok"},
             {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "/a"}}]},
         {"role": "user", "content": [
             {"type": "tool_result", "tool_use_id": "toolu_1", "content": "line1"},
             {"type": "text", "text": "go on"}]}],
        system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1"},
                {"type": "text", "text": "You are Claude Code."},
                {"type": "text", "text": "Second part"}])
    assert render_chat(msgs, think="high").text == (
        "<｜begin▁of▁sentence｜>You are Claude Code.\nSecond part<｜User｜>hi<｜Assistant｜>"
        "<think>plan</think>ok\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="Read">\n'
        '<｜DSML｜parameter name="file_path" string="true">/a</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
        "<｜User｜><tool_result>line1</tool_result>go on<｜Assistant｜><think>")


# ---------------------------------------------------------------------------
# §2.5 tools block

def test_tools_block_is_the_spec_text_with_raw_schema_lines():
    lines = ['{"name":"a"}', '{\n  "name": "b"\n}']
    assert chat.tools_block(lines) == SPEC_TOOLS_BLOCK.replace("<SCHEMA LINES>", "\n".join(lines))


def test_tools_block_fixed_text_is_1329_bytes_and_293_tokens(tok):
    fixed = SPEC_TOOLS_BLOCK.replace("<SCHEMA LINES>", "")
    assert chat.tools_block(["X"]).replace("\n\nX\n\n", "\n\n\n\n") == fixed
    assert (len(fixed.encode()), len(ids(tok, fixed))) == (1329, 293)


def test_tools_go_before_system_text_and_system_messages_are_hoisted():
    msgs = [{"role": "user", "content": "u"}, {"role": "system", "content": "late system"},
            {"role": "developer", "content": "dev"}]
    text = render_chat(msgs, tools=[{"name": "t"}], think="none").text
    assert text.startswith(BOS + "## Tools\n\n")
    assert text.endswith(
        'schemas.\n\nlate system\n\ndev<｜User｜>u<｜Assistant｜></think>'.replace(
            "schemas.", "Use the exact parameter names from the schemas."))


def test_schema_lines_keep_client_raw_bytes_and_unwrap_openai_functions():
    raw_fn = '{ "type": "function",\n  "function": {"name": "x",  "parameters": {}} }'
    assert chat.tool_schema_lines([raw_fn]) == ['{"name": "x",  "parameters": {}}']
    anthropic = '{"name":"Read","description":"d","input_schema":{"type":"object"}}'
    assert chat.tool_schema_lines([anthropic]) == [anthropic]
    flat = '{"type":"function","name":"f","parameters":{}}'
    assert chat.tool_schema_lines([flat]) == [flat]
    # a whole raw array works too, and parsed objects are written compactly
    assert chat.tool_schema_lines("[" + raw_fn + " , " + anthropic + "]") == [
        '{"name": "x",  "parameters": {}}', anthropic]
    assert chat.tool_schema_lines([{"type": "function", "function": {"name": "é", "x": [1, 2]}}]) \
        == ['{"name":"é","x":[1,2]}']
    assert chat.tool_schema_lines(None) == chat.tool_schema_lines([]) == []


def test_responses_namespace_and_tool_search_schema_lines_are_synthesized():
    ns = {"type": "namespace", "name": "mcp__fs__", "tools": [
        {"type": "function", "name": "read", "description": "Read", "parameters": {"type": "object"}},
        {"type": "function", "name": "ls"}]}
    assert chat.tool_schema_lines([ns]) == [
        '{"name":"mcp__fs__read","description":"Read","parameters":{"type":"object"}}',
        '{"name":"mcp__fs__ls","description":"","parameters":{"type":"object","properties":{}}}']
    assert chat.tool_schema_lines(['{"type":"tool_search"}']) == [
        '{"name":"tool_search","description":"Search available tools.",'
        '"parameters":{"type":"object","properties":{}}}']


def test_empty_tools_list_renders_no_tools_block_and_keeps_history():
    assert render_chat(TERSE, tools=[]).text == render_chat(TERSE).text
    text = render_chat(example_f_messages(), tools=None, think="none").text
    assert "## Tools" not in text and "<｜DSML｜invoke" in text


# ---------------------------------------------------------------------------
# §2.2 reasoning rules and structure

def test_thinking_keeps_old_reasoning_when_history_has_tool_calls_even_without_tools():
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "reasoning_content": "r1", "content": "",
             "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "a", "content": "res"},
            {"role": "assistant", "reasoning_content": "r2", "content": "done"},
            {"role": "user", "content": "next"}]
    p = render_chat(msgs, think="high")
    assert p.tool_context
    assert "<think>r1</think>" in p.text and "<think>r2</think>done" in p.text
    assert p.text.endswith("<｜User｜>next<｜Assistant｜><think>")
    # an assistant with no reasoning still gets an empty <think></think>
    msgs[1]["reasoning_content"] = None
    assert "<｜Assistant｜><think></think>\n\n<｜DSML｜" in render_chat(msgs).text


def test_non_thinking_renders_every_assistant_turn_with_close_tag_only():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b",
                                              "reasoning_content": "hidden"},
            {"role": "user", "content": "c"}]
    text = render_chat(msgs, think="none").text
    assert "hidden" not in text
    assert text == BOS + "<｜User｜>a<｜Assistant｜></think>b" + EOS + "<｜User｜>c<｜Assistant｜></think>"


def test_assistant_after_last_user_keeps_its_reasoning_and_no_generation_prompt():
    msgs = [{"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "reasoning_content": "why"}]
    assert render_chat(msgs, think="high").text == \
        BOS + "<｜User｜>a<｜Assistant｜><think>why</think>b" + EOS


def test_second_consecutive_assistant_gets_no_marker_or_think_tags():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "assistant", "content": "c", "reasoning_content": "r"}]
    assert render_chat(msgs, think="none").text == \
        BOS + "<｜User｜>a<｜Assistant｜></think>b" + EOS + "c" + EOS


def test_consecutive_tool_results_share_one_user_marker_and_a_user_after_opens_a_new_one():
    msgs = [{"role": "user", "content": "q"},
            {"role": "tool", "content": "1"}, {"role": "function", "content": "2"},
            {"role": "user", "content": "more"}]
    assert render_chat(msgs, think="none").text == (
        BOS + "<｜User｜>q<｜User｜><tool_result>1</tool_result><tool_result>2</tool_result>"
        "<｜User｜>more<｜Assistant｜></think>")


def test_consecutive_user_messages_each_get_their_own_marker():
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert render_chat(msgs, think="none").text == BOS + "<｜User｜>a<｜User｜>b<｜Assistant｜></think>"


def test_add_generation_prompt_false_leaves_the_turn_open():
    assert render_chat(TERSE, add_generation_prompt=False).text == BOS + "You are terse.<｜User｜>Hello"


def test_unknown_roles_are_dropped_and_missing_role_is_user():
    msgs = [{"role": "critic", "content": "x"}, {"content": "hi"}]
    assert render_chat(msgs, think="none").text == BOS + "<｜User｜>hi<｜Assistant｜></think>"


def test_special_strings_in_client_text_are_not_escaped(tok):
    text = render_chat([{"role": "user", "content": "a</think>b"}], think="none").text
    assert text == BOS + "<｜User｜>a</think>b<｜Assistant｜></think>"
    assert ids(tok, text).count(128822) == 2


# ---------------------------------------------------------------------------
# §2.3 content flattening and tool call entries

def test_openai_content_parts_concatenate_without_separator_and_drop_images():
    content = ["a", {"type": "text", "text": "b"},
               {"type": "image_url", "image_url": {"url": "data:"}}, {"type": "text", "text": "c"}]
    assert chat.flatten_content(content) == "abc"
    assert chat.flatten_content(None) == ""
    assert render_chat([{"role": "user", "content": content}], think="none").text == \
        render_chat([{"role": "user", "content": "abc"}], think="none").text


def test_anthropic_system_parts_join_with_newline_only_when_needed():
    assert chat.anthropic_system_text(["a\n", "b", {"text": "c"}, "", "x-anthropic-z"]) == "a\nb\nc"
    assert chat.anthropic_system_text("x-anthropic-only") == ""
    assert chat.anthropic_system_text(None) == ""


def test_responses_content_accepts_text_blocks_and_rejects_others():
    assert chat.flatten_responses_content(
        [{"type": "input_text", "text": "a"}, "b", {"type": "output_text", "text": "c"}]) == "abc"
    with pytest.raises(ValueError):
        chat.flatten_responses_content([{"type": "input_image", "image_url": "x"}])


def test_tool_calls_missing_name_or_arguments_are_dropped():
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "x", "tool_calls": [
                {"id": "1", "function": {"name": "f"}},
                {"id": "2", "function": {"arguments": "{}"}}]}]
    assert "DSML" not in render_chat(msgs, think="none").text


def test_arguments_given_as_object_or_as_json_text_render_the_same():
    def text(args):
        return render_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
                            "tool_calls": [{"function": {"name": "f", "arguments": args}}]}]).text
    assert text({"a": 1, "b": "x"}) == text('{"a": 1, "b": "x"}')


def test_reasoning_field_aliases():
    base = [{"role": "user", "content": "q"}]
    for key in ("reasoning_content", "reasoning", "thinking"):
        msgs = base + [{"role": "assistant", "content": "a", key: "R"}]
        assert "<think>R</think>a" in render_chat(msgs).text


def test_raw_dsml_on_the_message_and_replay_memory_are_used_verbatim():
    sampled = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
               '<｜DSML｜parameter name="a" string="false">[1, 2]</｜DSML｜parameter>\n'
               '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
    call = {"id": "call_x", "type": "function", "function": {"name": "f", "arguments": '{"a":[1,2]}'}}
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_x", "content": "ok"}]
    canonical = render_chat(msgs).text
    assert "[1,2]" in canonical and sampled not in canonical
    mem = ToolReplayMemory()
    mem.put("call_x", sampled)
    assert sampled + EOS in render_chat(msgs, replay=mem).text
    msgs[1]["raw_dsml"] = sampled
    assert sampled + EOS in render_chat(msgs).text


# ---------------------------------------------------------------------------
# §2.1 request controls

@pytest.mark.parametrize("body, api, mode", [
    ({}, "chat", "high"),
    ({"thinking": {"type": "disabled"}}, "chat", "none"),
    ({"thinking": {"type": "enabled", "budget_tokens": 5}}, "messages", "high"),
    ({"thinking": {"type": "other"}}, "chat", "high"),
    ({"thinking": False}, "chat", "none"),
    ({"think": False}, "completions", "none"),
    ({"reasoning_effort": "max"}, "chat", "max"),
    ({"reasoning_effort": "minimal"}, "chat", "high"),
    ({"reasoning_effort": "none"}, "chat", "none"),
    ({"thinking": {"type": "disabled"}, "reasoning_effort": "max"}, "chat", "none"),
    ({"output_config": {"effort": "max"}}, "messages", "max"),
    ({"reasoning": {"effort": "xhigh"}}, "responses", "high"),
    ({"reasoning": {"effort": "none"}}, "responses", "none"),
    ({"model": "deepseek-chat"}, "chat", "none"),
    ({"model": "deepseek-chat", "reasoning_effort": "high"}, "chat", "none"),
    ({"model": "deepseek-chat", "thinking": {"type": "enabled"}}, "chat", "high"),
    ({"model": "deepseek-chat", "reasoning": {"effort": "high"}}, "responses", "high"),
    ({"model": "deepseek-chat", "reasoning": {"effort": None}}, "responses", "none"),
    ({"model": "deepseek-reasoner"}, "messages", "high"),
])
def test_thinking_mode_from_request_controls(body, api, mode):
    assert chat.think_from_request(body, api) == mode


@pytest.mark.parametrize("body", [{"reasoning_effort": "turbo"}, {"reasoning_effort": 3},
                                  {"think": "yes"}])
def test_invalid_thinking_controls_are_rejected(body):
    with pytest.raises(ValueError, match="invalid JSON request"):
        chat.think_from_request(body, "chat")


# ---------------------------------------------------------------------------
# §2.8 CLI, REPL and completions

def test_cli_one_shot_prompt_equals_server_rendering_of_system_plus_user():
    p = chat.render_prompt("Hello", system="You are terse.", think="none")
    assert p.text == render_chat(TERSE, think="none").text
    assert chat.render_prompt("x").text == (
        BOS + "You are a helpful assistant<｜User｜>x<｜Assistant｜><think>")
    assert chat.render_prompt("x", system="").text == BOS + "<｜User｜>x<｜Assistant｜><think>"


def test_cli_segments_mark_the_specials_and_join_to_the_rendered_text():
    segs = chat.prompt_segments("2+2?", think="max", ctx=400_000)
    assert [s.text for s in segs if s.special] == [BOS, USER, ASSISTANT, "<think>"]
    assert [s.text for s in segs if not s.special] == [THINK_MAX_PREFIX, chat.DEFAULT_SYSTEM, "2+2?"]
    assert chat.segments_text(segs) == chat.render_prompt("2+2?", think="max", ctx=400_000).text
    assert chat.user_turn_segments("hi", "none")[-1].text == "</think>"


def test_repl_transcript_appends_turns_and_toggles_the_think_max_prefix():
    start = chat.render_transcript_start(think="high")
    transcript = start.text + chat.render_user_turn("a", "high") + "r</think>b" + EOS
    transcript += chat.render_user_turn("c", "high")
    assert transcript == (BOS + "You are a helpful assistant<｜User｜>a<｜Assistant｜><think>r</think>b"
                          + EOS + "<｜User｜>c<｜Assistant｜><think>")
    with_max = chat.set_think_max_prefix(transcript, True)
    assert with_max == BOS + THINK_MAX_PREFIX + transcript[len(BOS):]
    assert chat.set_think_max_prefix(with_max, True) == with_max
    assert chat.set_think_max_prefix(with_max, False) == transcript


def test_completions_prompt_uses_default_system_and_first_string_of_an_array():
    p = chat.render_completion(["first", "second"])
    assert p.text == BOS + "You are a helpful assistant<｜User｜>first<｜Assistant｜><think>"
    assert chat.render_completion("x", think="none").text.endswith("<｜Assistant｜></think>")


def test_prerendered_prompt_detection():
    assert chat.is_prerendered(BOS + "x") and not chat.is_prerendered("x" + BOS)


def test_assistant_turn_and_live_tail_renderings():
    calls = [{"id": "c", "function": {"name": "f", "arguments": '{"a":"b"}'}}]
    turn = chat.render_assistant_turn("ok", "why", calls, think="high")
    assert turn.startswith("why</think>ok\n\n<｜DSML｜tool_calls>") and turn.endswith(EOS)
    assert chat.render_assistant_turn("ok", "why", think="none") == "ok" + EOS
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "c", "content": "r1"},
            {"role": "system", "content": "ignored"},
            {"role": "user", "content": "and"}]
    assert chat.render_tail(msgs, 2, think="high") == (
        EOS + "<｜User｜><tool_result>r1</tool_result><｜User｜>and<｜Assistant｜><think>")


# ---------------------------------------------------------------------------
# §2.9 DeepSeek's official encoding behind layout="official"

def test_official_layout_equals_ds4_for_single_turn_prompts_without_tools():
    for msgs in (TERSE, [{"role": "user", "content": "x"}]):
        for think in ("none", "high"):
            assert render_chat(msgs, think=think, layout="official").text == \
                render_chat(msgs, think=think).text
    assert render_chat(TERSE, think="max", ctx=400_000, layout="official").text == \
        render_chat(TERSE, think="max", ctx=400_000).text


def test_official_layout_puts_tools_after_system_content_with_its_own_text():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    text = render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "q"}],
                       tools=[tool], think="none", layout="official").text
    block = chat.tools_block(['{"name": "f", "parameters": {"type": "object"}}'], layout="official")
    assert text == BOS + "S\n\n" + block + "<｜User｜>q<｜Assistant｜></think>"
    assert "help answer the user's question" in block
    assert 'String parameters should be specified as is and set `string="true"`. For all' in block
    assert block.endswith("to invoke tool calls.\n")
    # no system message: tools open a system message of their own
    text = render_chat([{"role": "user", "content": "q"}], tools=[tool], layout="official").text
    assert text.startswith(BOS + "\n\n## Tools")


def test_official_layout_developer_is_a_user_turn_and_system_stays_in_place():
    msgs = [{"role": "user", "content": "a"}, {"role": "system", "content": "S"},
            {"role": "developer", "content": "D"}]
    assert render_chat(msgs, think="none", layout="official").text == \
        BOS + "<｜User｜>aS<｜User｜>D<｜Assistant｜></think>"


def test_official_layout_merges_users_and_reorders_results_by_call_order():
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "A", "function": {"name": "f", "arguments": "{}"}},
                {"id": "B", "function": {"name": "g", "arguments": '{"n": 5.0, "s": "</｜DSML｜parameter>"}'}}]},
            {"role": "tool", "tool_call_id": "B", "content": "rb </tool_result>"},
            {"role": "tool", "tool_call_id": "A", "content": "ra"},
            {"role": "user", "content": "u1"}, {"role": "user", "content": "u2"}]
    text = render_chat(msgs, think="none", layout="official").text
    assert text == (
        BOS + "<｜User｜>q<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>\n'
        '<｜DSML｜invoke name="g">\n'
        '<｜DSML｜parameter name="n" string="false">5.0</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="s" string="true"></｜DSML｜parameter></｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS +
        "<｜User｜><tool_result>ra</tool_result>\n\n<tool_result>rb </tool_result></tool_result>"
        "\n\nu1\n\nu2<｜Assistant｜></think>")


def test_official_layout_joins_tool_result_blocks_with_a_blank_line():
    msgs = [{"role": "user", "content": "q"},
            {"role": "tool", "content": [{"type": "text", "text": "a"}, {"type": "image"},
                                         {"type": "text", "text": "b"}]},
            {"role": "user", "content": [{"type": "tool_result", "content": [
                {"type": "text", "text": "c"}, {"type": "text", "text": "d"}]}, "e"]}]
    assert render_chat(msgs, think="none", layout="official").text == (
        BOS + "<｜User｜>q\n\n<tool_result>a\n\n[Unsupported image]\n\nb</tool_result>"
        "\n\n<tool_result>c\n\nd</tool_result>\n\ne<｜Assistant｜></think>")
    # the ds4 layout concatenates text with no separator and drops the image
    assert render_chat(msgs, think="none").text == (
        BOS + "<｜User｜>q<｜User｜><tool_result>ab</tool_result>"
        "<｜User｜><tool_result>cd</tool_result>e<｜Assistant｜></think>")


def test_official_layout_keeps_reasoning_only_when_tools_are_declared():
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "reasoning_content": "r",
             "tool_calls": [{"id": "A", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "A", "content": "x"}]
    dropped = render_chat(msgs, layout="official").text
    assert dropped == (BOS + "<｜User｜>q<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n"
                       '<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
                       + EOS + "<｜User｜><tool_result>x</tool_result><｜Assistant｜><think>")
    kept = render_chat(msgs, tools=[{"name": "f"}], layout="official").text
    assert "<｜User｜>q<｜Assistant｜><think>r</think>\n\n<｜DSML｜" in kept
    # the ds4 layout keeps it in both cases (tool history counts)
    assert "<think>r</think>" in render_chat(msgs).text


def test_official_layout_message_level_tools_and_latest_reminder():
    msgs = [{"role": "system", "content": "S"},
            {"role": "latest_reminder", "content": "date"},
            {"role": "developer", "content": "D", "tools": [{"name": "t"}]}]
    text = render_chat(msgs, think="none", layout="official").text
    assert text.startswith(BOS + "S<｜latest_reminder｜>date<｜User｜>D\n\n## Tools")
    assert text.endswith('{"name": "t"}\n\nYou MUST strictly follow the above defined tool name and '
                         "parameter schemas to invoke tool calls.\n<｜Assistant｜></think>")


def test_layout_and_think_arguments_are_validated():
    with pytest.raises(ValueError):
        render_chat(TERSE, layout="jinja")
    with pytest.raises(ValueError):
        render_chat(TERSE, think="low")
    assert render_chat(TERSE, think=False).text == render_chat(TERSE, think="none").text


# ---------------------------------------------------------------------------
# §8 official test vectors: rendering + tokenization gives the API's prompt_tokens

VECTOR_COUNTS = {"short_italian_fact": 21, "short_code_completion": 27, "short_reasoning_plain": 18,
                 "long_memory_archive": 3353, "long_code_audit": 3844}


@pytest.mark.parametrize("layout", ["ds4", "official"])
@pytest.mark.parametrize("name", sorted(VECTOR_COUNTS))
def test_official_vector_prompt_token_counts(tok, name, layout):
    path = VECTOR_PROMPTS / f"{name}.txt"
    if not path.is_file():
        pytest.skip(f"official test-vector prompt not present at {path} "
                    "(the shared folder holds them when the steering side provides them)")
    prompt = path.read_text(encoding="utf-8")
    text = render_chat([{"role": "user", "content": prompt}], think="none", layout=layout).text
    got = ids(tok, text)
    assert len(got) == VECTOR_COUNTS[name]
    assert got[:2] == [0, 128803] and got[-2:] == [128804, 128822]
