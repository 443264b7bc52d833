"""LLM.chat's vLLM keywords: chat_template_kwargs reach the template, tools apply with one SamplingParams
per conversation, a tool_choice without tools is refused rather than ignored, and each output carries the
rendered prompt."""

from __future__ import annotations

import pytest

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached

PARAMS = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
CONV = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
# Reads a variable the way Qwen3's template reads enable_thinking.
TEMPLATE = ("{% for m in messages %}<{{ m.content }}>{% endfor %}"
            "{% if enable_thinking is defined and not enable_thinking %}NOTHINK{% endif %}"
            "{% if add_generation_prompt %}GEN{% endif %}")


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(tiny_model_cached("qwen2")), device="cpu", max_model_len=256)


def _prompt_text(llm: LLM, **kwargs: object) -> str:
    out = llm.chat(CONV, PARAMS, chat_template=TEMPLATE, **kwargs)[0]
    text = llm.tokenizer.decode(out.prompt_token_ids)
    assert out.prompt == text  # as vLLM's chat, the output carries the rendered conversation
    return text


def test_chat_template_kwargs_reach_the_template(llm: LLM) -> None:
    assert _prompt_text(llm) == "<hi>GEN"
    assert _prompt_text(llm, chat_template_kwargs={"enable_thinking": False}) == "<hi>NOTHINKGEN"
    # As in vLLM, chat_template_kwargs are merged last: they override the keywords of chat() itself.
    assert _prompt_text(llm, chat_template_kwargs={"add_generation_prompt": False}) == "<hi>"
    # tools among them is what the template shows (it was a TypeError: apply_chat_template's tools twice).
    shows_tools = "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}" + TEMPLATE
    out = llm.chat(CONV, PARAMS, chat_template=shows_tools, chat_template_kwargs={"tools": TOOLS})[0]
    assert out.prompt == "[get_weather]<hi>GEN"


def test_tools_apply_to_each_of_a_list_of_sampling_params(llm: LLM) -> None:
    params = [PARAMS, PARAMS.clone(max_tokens=3)]
    outs = llm.chat([CONV, CONV], params, tools=TOOLS, tool_choice="required")
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 3]
    # tool_choice "required" constrains the reply to a tool call: both start the same way.
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids[:2]
    with pytest.raises(ValueError, match="2 conversations but 1 sampling params"):
        llm.chat([CONV, CONV], [PARAMS], tools=TOOLS)


def test_tool_choice_without_tools_is_an_error(llm: LLM) -> None:
    with pytest.raises(ValueError, match="tool_choice 'required' needs tools"):
        llm.chat(CONV, PARAMS, tool_choice="required")
    assert llm.chat(CONV, PARAMS, tool_choice="none")[0].outputs[0].token_ids  # vLLM allows "none" alone


# How Qwen2.5's and Llama 3.1's templates write a history: a call's arguments through `tojson` (they
# expect the object, as vLLM's chat passes it) and a message's content as a string.
TOJSON_TEMPLATE = ("{% for m in messages %}{% if m.tool_calls %}{% for tc in m.tool_calls %}"
                   "<call>{{ tc.function.arguments | tojson }}</call>{% endfor %}"
                   "{% else %}<{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}")


def test_a_history_in_openai_shapes_renders_as_the_http_api_renders_it(llm: LLM) -> None:
    """Agent frameworks send back a call's arguments as a JSON string and tool results as content parts;
    the template must see the arguments object and the text, not a string written again as JSON."""
    conv = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]}]
    text = llm.chat(conv, PARAMS, chat_template=TOJSON_TEMPLATE)[0].prompt
    assert text == '<user>weather?<call>{"city": "Paris"}</call><tool>sunny'


def test_vllm_chat_keywords_are_not_template_variables(llm: LLM) -> None:
    """vLLM's chat keywords that agentserve does not implement are errors naming them, not variables
    handed to the template (where they would be silently ignored); their defaults are accepted."""
    assert _prompt_text(llm, chat_template_content_format="string", mm_processor_kwargs=None) == "<hi>GEN"
    with pytest.raises(ValueError, match="chat_template_content_format 'openai'"):
        llm.chat(CONV, PARAMS, chat_template_content_format="openai")
    with pytest.raises(ValueError, match="mm_processor_kwargs"):
        llm.chat(CONV, PARAMS, mm_processor_kwargs={"num_crops": 4})
