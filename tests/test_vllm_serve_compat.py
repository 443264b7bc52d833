"""What a vLLM user brings along: the model's generation_config.json as default sampling parameters (vLLM's
--generation-config auto; 'vllm' turns it off), --chat-template (a file or the template itself), and
`vllm serve`'s flags (aliases, and flags for what is always on here; --tool-call-parser checked against
the chat template)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from agentserve import SamplingParams
from agentserve.cli import build_parser, engine_config_from_args
from agentserve.config import EngineConfig
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.llm import LLM
from agentserve.model.arch_config import ModelLoadError
from agentserve.sessions.store import SessionStore
from agentserve.sessions.types import TurnResult
from agentserve.testing import tiny_model_cached
from agentserve.vllm_flags import check_tool_call_parser
from helpers.live_server import live_openai

PROMPTS = ["Once upon a time", "The capital of"]
ENGINE = dict(device="cpu", dtype="float32", num_blocks=128, max_model_len=256)


def _with_generation_config(tmp_path: Path, values: dict) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_cached("qwen2"), model)
    gen = model / "generation_config.json"
    config = json.loads(gen.read_text()) if gen.is_file() else {}
    gen.write_text(json.dumps({**config, **values}))
    return model


def test_generation_config_supplies_the_default_sampling(tmp_path: Path) -> None:
    model = _with_generation_config(tmp_path, {"top_k": 1, "repetition_penalty": 1.0, "do_sample": True})
    llm = LLM(str(model), **ENGINE)
    assert llm.get_default_sampling_params().top_k == 1
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SamplingParams(temperature=0.0))]
    # No parameters: the model's top_k = 1 makes sampling at temperature 1 pick the argmax.
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS)] == want
    llm.close()
    # Over HTTP a request that leaves top_k unset gets the model's; --generation-config vllm ignores it.
    for mode, expect_greedy in (("auto", True), ("vllm", False)):
        with live_openai(str(model), max_model_len=256, generation_config=mode) as client:
            plain = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=8, seed=3)
            greedy_http = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=8, temperature=0)
            assert (plain.choices[0].text == greedy_http.choices[0].text) == expect_greedy


def test_generation_config_max_new_tokens_caps_requests_without_max_tokens(tmp_path: Path) -> None:
    model = _with_generation_config(tmp_path, {"max_new_tokens": 5})
    llm = LLM(str(model), **ENGINE)
    assert llm.get_default_sampling_params().max_tokens == 5
    # Offline without parameters (ignore_eos would need parameters: a random model may stop early, never late).
    assert all(len(o.outputs[0].token_ids) <= 5 for o in llm.generate(PROMPTS))
    # A request's own max_tokens stands; offline, None is the context's room (vLLM's processor fills it so:
    # max_new_tokens only makes the default parameters' max_tokens), where the servers cap an unset one.
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=None)
    for out in llm.generate(PROMPTS, params):
        assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == llm.engine.max_model_len
    assert [len(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params.clone(max_tokens=9))] == [9, 9]
    llm.close()
    with live_openai(str(model), max_model_len=256) as client:
        messages = [{"role": "user", "content": "hi"}]
        unset = client.chat.completions.create(model="m", messages=messages, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert unset.usage.completion_tokens == 5 and unset.choices[0].finish_reason == "length"
        given = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=7,
                                               extra_body={"ignore_eos": True})
        assert given.usage.completion_tokens == 7
        # Legacy completions default max_tokens to 16 (OpenAI's and vLLM's protocol): a given value, kept.
        legacy = client.completions.create(model="m", prompt=PROMPTS[0], temperature=0, extra_body={"ignore_eos": True})
        assert legacy.usage.completion_tokens == 16
    # A session turn that sets no max_tokens is capped the same way (it resolved its own limit before).
    assert _session_turn_tokens(model, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=None)) == 5
    assert _session_turn_tokens(model, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=9)) == 9


def _session_turn_tokens(model: Path, params: SamplingParams) -> int:
    async def turn() -> int:
        aeng = AsyncEngine(Engine(EngineConfig.from_kwargs(str(model), **ENGINE)))
        store = SessionStore(aeng)
        try:
            session = await store.create([{"role": "user", "content": "hi"}])
            events = [e async for e in store.turn(session.session_id, [], params)]
            result = events[-1]
            assert isinstance(result, TurnResult)
            return len(result.token_ids)
        finally:
            await store.close_all()
            aeng.shutdown()

    return asyncio.run(turn())


def test_unusable_generation_defaults_and_bad_modes_are_refused(tmp_path: Path) -> None:
    model = _with_generation_config(tmp_path, {"top_p": 1.5})
    with pytest.raises(ModelLoadError, match="generation-config vllm"):
        LLM(str(model), **ENGINE)
    with pytest.raises(ModelLoadError, match="max_tokens"):
        LLM(str(_with_generation_config(tmp_path / "b", {"max_new_tokens": 0})), **ENGINE)
    with pytest.raises(ModelLoadError, match="no generation_config.json"):
        LLM(str(tiny_model_cached("qwen2")), generation_config=str(tmp_path / "nowhere"), **ENGINE)


def test_chat_template_override(tmp_path: Path) -> None:
    template = "{% for m in messages %}<<{{ m.role }}>>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<<assistant>>{% endif %}"
    path = tmp_path / "template.jinja"
    path.write_text(template)
    messages = [{"role": "user", "content": "hi"}]
    for given in (str(path), template):
        llm = LLM(str(tiny_model_cached("qwen2")), chat_template=given, **ENGINE)
        assert llm.tokenizer.decode(llm.render_chat(messages)) == "<<user>>hi<<assistant>>"
        llm.close()
    with pytest.raises(ModelLoadError, match="neither a file nor a template"):
        LLM(str(tiny_model_cached("qwen2")), chat_template=str(tmp_path / "missing.jinja"), **ENGINE)


def test_tool_call_messages_without_content_on_a_template_that_concatenates_it(tmp_path: Path) -> None:
    """An assistant message that only calls tools (content null or absent, as clients send it back) reaches
    the template with empty content, as vLLM passes it: SmolLM2's and other plain templates add
    message['content'] to a string, which a null content breaks."""
    template = ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\": \"x\"}"}}
    for assistant in ({"role": "assistant", "tool_calls": [call]}, {"role": "assistant", "content": None, "tool_calls": [call]}):
        messages = [{"role": "user", "content": "find x"}, assistant,
                    {"role": "tool", "tool_call_id": "call_1", "content": "x is 42"}]
        llm = LLM(str(tiny_model_cached("qwen2")), chat_template=template, **ENGINE)
        rendered = llm.render_chat(messages)
        assert llm.tokenizer.decode(rendered) == "<user>find x\n<assistant>\n<tool>x is 42\n<assistant>"
        llm.close()
        with live_openai("qwen2", max_model_len=256, chat_template=template) as client:
            out = client.chat.completions.create(model="m", messages=messages, max_tokens=2)
            assert out.usage.prompt_tokens == len(rendered)


def test_vllm_serve_flags() -> None:
    path = str(tiny_model_cached("qwen2"))
    args = build_parser().parse_args(["serve", "--model", path, "--port", "8123", "--swap-space", "2",
                                      "--guided-decoding-backend", "guidance", "--enable-auto-tool-choice",
                                      "--trust-remote-code", "--enable-chunked-prefill", "--disable-log-requests",
                                      "--tool-call-parser", "hermes", "--generation-config", "vllm"])
    config = engine_config_from_args(args)
    assert config.server.http_port == 8123 and config.cache.swap_space_gb == 2.0
    assert config.grammar_backend == "llguidance" and config.model.generation_config == "vllm"
    template = LLM(path, **ENGINE).tokenizer.chat_template
    check_tool_call_parser("hermes", template)
    for wrong in ("mistral", "pythonic"):
        with pytest.raises(SystemExit, match="--tool-call-parser"):
            check_tool_call_parser(wrong, template)
    clash = build_parser().parse_args(["serve", "--model", path, "--port", "1", "--http-port", "2"])
    with pytest.raises(SystemExit, match="--port and --http-port"):
        engine_config_from_args(clash)
