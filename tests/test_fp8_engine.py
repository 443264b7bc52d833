"""The CPU engine with an FP8 KV cache (and FP8 weights): pool sizing counts e4m3 bytes, sessions
stay exact across turns, swap-out / swap-in (the swap space holds e4m3 pages, moved bit for bit)
and forks, grammar-constrained outputs stay valid, the KV scales come from the checkpoint or a
calibration, and the CLI flags reach the config.

"Exact" here: a session turn reading its cached e4m3 pages gives the same tokens as a stateless
generate with the same settings over the whole prompt. The kernels read every key and value from
the pages, also those written in the same step, so cached and freshly prefilled KV are the same
e4m3 values."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from safetensors.torch import load_file, save_file

from agentserve import SamplingParams
from agentserve.cache.kv_cache import bytes_per_block
from agentserve.cli import add_engine_args, engine_config_from_args
from agentserve.kernels.fp8_utils import FP8_DTYPE
from agentserve.llm import LLM
from agentserve.model.arch_config import ArchConfig
from agentserve.service import agent_pb2 as pb
from conftest_grpc import SYSTEM, TOOLS, make_engine, model_path, run, serving

FP8 = dict(kv_cache_dtype="fp8", quantization="fp8")
GREEDY = dict(temperature=0.0, max_tokens=8, return_token_ids=True)
BS = 16
NEW_MESSAGES: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Find the weather in Paris and read notes.txt."}],
    [{"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 21, "conditions": "sunny"}'}],
    [{"role": "user", "content": "Thanks! Now summarise both in one sentence."}],
]


def test_kv_pool_counts_fp8_bytes() -> None:
    """On the CPU the pool is cpu_kv_cache_gb / bytes per page: e4m3 pages are a quarter of fp32
    ones (half of bf16 ones on the GPU), so four times the pages fit, and the swap space likewise."""
    opts = dict(device="cpu", dtype="float32", cpu_kv_cache_gb=0.01, swap_space_gb=0.005)
    with LLM(model_path("qwen2"), **opts) as base, LLM(model_path("qwen2"), kv_cache_dtype="fp8", **opts) as fp8:
        a = base.engine.arch
        fp8_page = bytes_per_block(a.num_layers, BS, a.num_kv_heads, a.head_dim, FP8_DTYPE)
        assert fp8_page * 4 == bytes_per_block(a.num_layers, BS, a.num_kv_heads, a.head_dim, torch.float32)
        assert fp8.engine.runner.num_blocks == int(0.01 * 2**30 // fp8_page)
        assert fp8.engine.runner.num_blocks >= 4 * base.engine.runner.num_blocks - 3
        kv = fp8.engine.runner.kv_cache
        assert kv.layers[0][0].dtype == FP8_DTYPE and kv.swap.dtype == FP8_DTYPE
        assert kv.num_swap_blocks >= 4 * base.engine.runner.kv_cache.num_swap_blocks - 3


def _reference(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Stateless greedy generation with the same FP8 settings, under the sessions' tool grammar."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, tools=TOOLS, tool_choice="auto")
    with LLM(model_path("qwen2"), device="cpu", dtype="float32", max_model_len=1024, num_blocks=512, **FP8) as llm:
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]


async def _pressure(client: Any, pages: int, salt: str) -> None:
    """A stateless request that needs `pages` pages: the scheduler reclaims idle sessions' pages."""
    prompt = [(7 * i + len(salt)) % 500 + 3 for i in range(pages * BS - 8)]
    done = await client.generate_done(prompt_token_ids=prompt, max_tokens=8, temperature=0, ignore_eos=True,
                                      cache_salt=salt)
    assert len(done.token_ids) == 8


def test_sessions_swap_and_fork_are_exact_with_fp8() -> None:
    aeng = make_engine(num_blocks=48, max_model_len=720, swap_space_gb=0.01, **FP8)
    kv = aeng.engine.runner.kv_cache
    pool = aeng.engine.pool
    turns: list[Any] = []

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            session = await client.create_session([SYSTEM], tools=TOOLS)
            turns.append(await session.run_turn(NEW_MESSAGES[0], **GREEDY))
            held = (await session.refresh()).num_pages
            table = list(handle.store.sessions[session.info.session_id].block_table)
            pages = [t.index_select(0, torch.tensor(table)).view(torch.uint8).clone() for layer in kv.layers
                     for t in layer]
            await _pressure(client, pool.num_blocks - held + 4, "p1")
            info = await session.refresh()
            assert info.state == pb.SESSION_STATE_SWAPPED and info.num_swapped_pages == held
            slots = torch.tensor(list(handle.store.sessions[session.info.session_id].swap_slots))
            swapped = kv.swap[slots]
            assert swapped.dtype == FP8_DTYPE
            layers = [swapped[:, i, j].view(torch.uint8) for i in range(swapped.shape[1]) for j in (0, 1)]
            assert all(torch.equal(a, b) for a, b in zip(pages, layers, strict=True))
            t = await session.run_turn(NEW_MESSAGES[1], **GREEDY)
            assert t.done.session.state == pb.SESSION_STATE_RESIDENT
            assert t.done.usage.swapped_in_tokens == info.num_kv_tokens == t.done.usage.cached_tokens
            turns.append(t)
            child = await session.fork()
            turns.append(await child.run_turn(NEW_MESSAGES[2], **GREEDY))
            turns.append(await session.run_turn(NEW_MESSAGES[2], **GREEDY))
            assert turns[-1].token_ids == turns[-2].token_ids
            await child.close()
            await session.close()

    try:
        run(body())
    finally:
        aeng.shutdown()
    prompts = [list(t.done.prompt_token_ids) for t in turns]
    assert _reference(prompts, GREEDY["max_tokens"]) == [t.token_ids for t in turns]


def test_grammar_outputs_stay_valid_with_fp8() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["city", "days"], "additionalProperties": False}
    with LLM(model_path("qwen2"), device="cpu", dtype="float32", num_blocks=128, **FP8) as llm:
        params = [SamplingParams(temperature=t, seed=7, max_tokens=80, json_schema=schema) for t in (0.0, 0.8)]
        params.append(SamplingParams(temperature=0.0, max_tokens=8, choice=["sunny", "rainy", "cloudy"]))
        outs = llm.generate(["Weather plan as JSON:", "Another plan:", "The weather is"], params)
        for out in outs[:2]:
            jsonschema.validate(json.loads(out.outputs[0].text), schema)
        assert outs[2].outputs[0].text in ("sunny", "rainy", "cloudy")


def test_cli_flags_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from_args(parser.parse_args(
        ["--model", "m.gguf", "--quantization", "fp8", "--kv-cache-dtype", "fp8"]))
    assert config.model.quantization == "fp8" and config.cache.kv_cache_dtype == "fp8"
    config = engine_config_from_args(parser.parse_args(["--model", "m"]))
    assert config.model.quantization is None and config.cache.kv_cache_dtype == "auto"


def _attention_scales(llm: LLM) -> list[tuple[float, float]]:
    return [(float(layer.self_attn.k_scale), float(layer.self_attn.v_scale)) for layer in llm.engine.runner.model.layers]


def test_kv_scales_come_from_the_checkpoint_or_a_calibration(tmp_path: Path) -> None:
    """An FP8 checkpoint's kv-cache scales (self_attn.k_scale / v_scale, or the older k_proj /
    v_proj output_scale) are used as they are; without them the runner calibrates each layer."""
    src = Path(model_path("qwen2"))
    dst = tmp_path / "with_scales"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    num_layers = ArchConfig.from_dir(src).num_layers
    for i in range(num_layers):
        if i == 0:  # the older naming on the first layer
            tensors[f"model.layers.{i}.self_attn.k_proj.output_scale"] = torch.tensor([0.03])
            tensors[f"model.layers.{i}.self_attn.v_proj.output_scale"] = torch.tensor([0.002])
        else:
            tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor([0.01 * (i + 1)])
            tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([0.001, 0.004])  # per head: the max
    save_file(tensors, str(dst / "model.safetensors"))
    with LLM(str(dst), device="cpu", dtype="float32", num_blocks=64, kv_cache_dtype="fp8") as llm:
        want = [(0.03, 0.002)] + [(0.01 * (i + 1), 0.004) for i in range(1, num_layers)]
        got = _attention_scales(llm)
        assert [s for pair in got for s in pair] == pytest.approx([s for pair in want for s in pair])
        assert llm.generate(["The quick brown fox"], SamplingParams(max_tokens=4, temperature=0.0))[0].outputs[0].token_ids
    with LLM(str(src), device="cpu", dtype="float32", num_blocks=64, kv_cache_dtype="fp8") as llm:
        calibrated = _attention_scales(llm)
        assert all(0 < s < 1 for pair in calibrated for s in pair) and len(set(calibrated)) == num_layers
    with LLM(str(src), device="cpu", dtype="float32", num_blocks=64) as llm:  # 16-bit pages: never calibrated
        assert set(_attention_scales(llm)) == {(1.0, 1.0)}
