"""Bad input gets a clear error and the engine keeps serving; stop strings and stop ids; streaming
deltas; the async engine's streams and cancellation."""

from __future__ import annotations

import asyncio

import pytest

from agentserve import SamplingParams
from agentserve.engine.async_engine import AsyncEngine
from agentserve.errors import InvalidRequestError
from agentserve.llm import LLM
from agentserve.model.arch_config import ModelLoadError
from agentserve.testing import tiny_model_cached


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(tiny_model_cached("qwen2")), device="cpu", max_model_len=256)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens must be a positive integer"),
    (dict(max_tokens=-3), "max_tokens must be a positive integer"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_k=-2), "top_k"),
    (dict(n=0), "n must be"),
])
def test_bad_sampling_params(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        SamplingParams(**kwargs)


def test_bad_prompts_fail_alone_and_engine_keeps_serving(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("good", "Hello", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", "", SamplingParams())
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty-ids", [], SamplingParams())
    with pytest.raises(InvalidRequestError, match="exceeds max_model_len"):
        engine.add_request("long", [5] * 200, SamplingParams(max_tokens=100))
    with pytest.raises(InvalidRequestError, match="max_model_len is 256"):
        engine.add_request("too-long", [5] * 300, SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError, match="token ids must be integers"):
        engine.add_request("bad-ids", [1, 10**9], SamplingParams())
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("good", "again", SamplingParams())
    done = []
    while engine.has_unfinished():
        done += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in done] == ["good"] and len(done[0].outputs[0].token_ids) == 8


def test_a_request_larger_than_the_kv_cache_names_its_lengths() -> None:
    # A pool of 4 pages of 16 tokens under max_model_len 256: the request fits the model, not the cache.
    small = LLM(str(tiny_model_cached("qwen2")), device="cpu", max_model_len=256, num_blocks=4)
    with pytest.raises(InvalidRequestError, match=r"prompt \(40 tokens\) \+ max_tokens \(60\) needs up to 7 KV pages "
                       r"of 16 tokens; the KV cache has only 4 \(64 tokens\); lower max_tokens"):
        small.engine.add_request("big", [5] * 40, SamplingParams(max_tokens=60))
    small.engine.add_request("fits", [5] * 40, SamplingParams(max_tokens=8, ignore_eos=True))
    done = []
    while small.engine.has_unfinished():
        done += [o for o in small.engine.step() if o.finished]
    assert [len(o.outputs[0].token_ids) for o in done] == [8]


def test_offline_generate_stops_a_reply_at_the_context_as_vllm_does(llm: LLM) -> None:
    """vLLM's offline LLM runs a request whose max_tokens the context cannot hold up to max_model_len
    (finish_reason "length"); the engine's own add_request (and the servers) refuse it. A prompt that leaves
    no room is still refused."""
    out = llm.generate([[5] * 200], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))[0].outputs[0]
    assert (len(out.token_ids), out.finish_reason) == (56, "length")
    with pytest.raises(InvalidRequestError, match="max_model_len is 256"):
        llm.generate([[5] * 256], SamplingParams(max_tokens=4))
    small = LLM(str(tiny_model_cached("qwen2")), device="cpu", max_model_len=256, num_blocks=4)
    out = small.generate([[5] * 40], SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))[0].outputs[0]
    assert (len(out.token_ids), out.finish_reason) == (24, "length")  # the 64 tokens the KV cache holds
    small.close()
    # min_tokens past the room ends there too (it raised "min_tokens must be in [0, max_tokens]"), with
    # max_tokens given, left at the default or unset.
    for prompt_len, params in ((200, SamplingParams(max_tokens=100, min_tokens=80)),
                               (250, SamplingParams(min_tokens=10)), (200, SamplingParams(max_tokens=None, min_tokens=60))):
        out = llm.generate([[5] * prompt_len], params)[0].outputs[0]
        assert (len(out.token_ids), out.finish_reason) == (256 - prompt_len, "length"), params


def test_unknown_model_path() -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM("/nonexistent/model/dir", device="cpu")


def test_unknown_architecture(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ModelLoadError, match="unsupported architecture.*GPT2LMHeadModel"):
        LLM(str(tmp_path), device="cpu")


def test_mismatched_tensor_shape(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import shutil

    src = tiny_model_cached("llama")
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="has shape .* the config implies"):
        LLM(str(tmp_path), device="cpu")


def test_unknown_engine_option() -> None:
    with pytest.raises(ValueError, match="unknown engine option 'max_num_seq'"):
        LLM(str(tiny_model_cached("qwen2")), device="cpu", max_num_seq=4)


def test_vllm_llm_keywords_are_taken_as_the_cli_takes_their_flags() -> None:
    # vLLM's LLM(...) keywords whose `vllm serve` flags agentserve accepts (agentserve/vllm_flags.py).
    llm = LLM(str(tiny_model_cached("qwen2")), device="cpu", max_model_len=128, trust_remote_code=True,
              swap_space=0.5, enable_chunked_prefill=True, disable_log_stats=True)
    assert llm.engine.config.cache.swap_space_gb == 0.5
    with pytest.raises(ValueError, match="swap_space and swap_space_gb"):
        LLM(str(tiny_model_cached("qwen2")), device="cpu", swap_space=1, swap_space_gb=2)
    with pytest.raises(ValueError, match="enable_chunked_prefill=False"):
        LLM(str(tiny_model_cached("qwen2")), device="cpu", enable_chunked_prefill=False)


def test_stop_strings_and_stop_ids(llm: LLM) -> None:
    base = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    full = llm.generate(["Once upon a time"], base)[0].outputs[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = llm.generate(["Once upon a time"], base.clone(stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[:full.text.index(stop)]
    kept = llm.generate(["Once upon a time"], base.clone(stop=[stop], include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == full.text[:full.text.index(stop) + len(stop)]
    stop_id = full.token_ids[5]
    by_id = llm.generate(["Once upon a time"], base.clone(stop_token_ids=[stop_id]))[0].outputs[0]
    assert by_id.token_ids == full.token_ids[:full.token_ids.index(stop_id) + 1]
    assert by_id.stop_reason == stop_id and by_id.finish_reason == "stop"
    assert full.finish_reason == "length"


def test_streamed_deltas_reassemble(llm: LLM) -> None:
    engine = llm.engine
    engine.emit_unfinished = True  # stream: an output per step, as the servers get
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=["zzz-never"])
    engine.add_request("stream", "A story about a dragon", params)
    text, ids, final = "", [], None
    while engine.has_unfinished():
        for out in engine.step():
            text += out.outputs[0].delta_text
            ids += out.outputs[0].delta_token_ids
            final = out
    assert final is not None and final.finished
    engine.emit_unfinished = False
    assert text == final.outputs[0].text and ids == final.outputs[0].token_ids
    expected = llm.tokenizer.decode(ids, skip_special_tokens=True)
    assert text == expected


def test_async_engine_streams_and_cancellation_frees_pages() -> None:
    aeng = AsyncEngine.from_kwargs(str(tiny_model_cached("qwen2")), device="cpu")

    async def main() -> None:
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        outs = [o async for o in aeng.generate("a", "Hello world", params)]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 12
        assert "".join(o.outputs[0].delta_text for o in outs) == outs[-1].outputs[0].text

        long_params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

        async def consume_two() -> None:
            n = 0
            async for _ in aeng.generate("b", "Count forever", long_params):
                n += 1
                if n == 2:
                    break  # the client leaves: the request must be aborted

        await consume_two()
        task = asyncio.create_task(asyncio.wait_for(
            _drain(aeng.generate("c", "Another long one", long_params)), timeout=0.05))
        with pytest.raises(asyncio.TimeoutError):
            await task
        for _ in range(100):
            if not await aeng.run(aeng.engine.has_unfinished):
                break
            await asyncio.sleep(0.02)
        await aeng.run(aeng.engine.pool.check_all_free)
        with pytest.raises(InvalidRequestError):
            async for _ in aeng.generate("d", "", params):
                pass
        outs = [o async for o in aeng.generate("e", "Still serving", params)]
        assert outs[-1].finished

    try:
        asyncio.run(main())
    finally:
        aeng.shutdown()


async def _drain(gen) -> None:  # type: ignore[no-untyped-def]
    async for _ in gen:
        pass
