"""vLLM's `speculative_config` (a dict offline, JSON on the command line) read onto agentserve's speculation
options: the same engine as agentserve's own flags, and a clear error naming the key for whatever cannot
be honoured (another method, a sharded draft, an unknown key, a conflicting flag, bad JSON)."""

from __future__ import annotations

import pytest

from agentserve import SamplingParams
from agentserve.cli import build_parser, engine_config_from_args
from agentserve.config import EngineConfig
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached
from helpers.spec_models import small_draft

PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7, 8], [11, 12, 13, 14, 15, 11, 12, 13]]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_blocks=64)


def test_offline_dict_speculates_as_the_flags_do() -> None:
    target = str(tiny_model_cached("llama3"))
    draft = small_draft("llama3")
    plain = LLM(target, **ENGINE)
    want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, PARAMS)]
    plain.close()
    for spec in ({"model": draft, "num_speculative_tokens": 3}, {"method": "ngram", "num_speculative_tokens": 2,
                                                                   "prompt_lookup_min": 1, "prompt_lookup_max": 3}):
        llm = LLM(target, speculative_config=spec, spec_dynamic=False, **ENGINE)
        cfg = llm.engine.config.spec
        assert cfg.num_speculative_tokens == spec["num_speculative_tokens"]
        assert cfg.method == ("draft_model" if "model" in spec else "ngram")
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)] == want
        assert llm.engine.metrics.spec_num_draft_tokens > 0
        llm.close()


def test_cli_json_flag() -> None:
    args = build_parser().parse_args(["serve", "--model", "m", "--speculative-config",
                                      '{"model": "d", "num_speculative_tokens": 5, "quantization": "fp8"}'])
    spec = engine_config_from_args(args).spec
    assert (spec.draft_model, spec.num_speculative_tokens, spec.draft_quantization, spec.method) == ("d", 5, "fp8",
                                                                                                    "draft_model")
    args = build_parser().parse_args(["serve", "--model", "m", "--speculative-config", '{"model": "[ngram]"}'])
    assert engine_config_from_args(args).spec.method == "ngram"  # vLLM's older n-gram spelling


@pytest.mark.parametrize("spec,match", [
    ({"method": "eagle", "model": "d"}, "method 'eagle' is not supported"),
    ({"model": "d", "disable_by_batch_size": 8}, "'disable_by_batch_size' not supported"),
    ({"model": "d", "draft_tensor_parallel_size": 2}, "draft_tensor_parallel_size 2"),
    ({"num_speculative_tokens": 3}, "give 'model'"),
    ('{"model": "d",', "not valid JSON"),
    ([1, 2], "expected an object"),
    ({"model": "[ngram]", "method": "draft_model"}, "n-gram proposer"),
    ({"model": "d", "quantization": "int4"}, "draft_quantization"),
])
def test_what_cannot_be_honoured_is_refused_with_the_key(spec: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EngineConfig.from_kwargs("m", speculative_config=spec)


def test_a_flag_given_twice_must_agree() -> None:
    with pytest.raises(ValueError, match="num_speculative_tokens=5 conflicts"):
        EngineConfig.from_kwargs("m", num_speculative_tokens=5, speculative_config={"model": "d", "num_speculative_tokens": 2})
    cfg = EngineConfig.from_kwargs("m", draft_model="d", speculative_config={"model": "d", "num_speculative_tokens": 2})
    assert cfg.spec.draft_model == "d" and cfg.spec.num_speculative_tokens == 2


def test_vllms_ngram_spellings_and_lookup_bounds() -> None:
    """vLLM's SpeculativeConfig reads model "ngram" / "[ngram]" (method unset) and method "[ngram]" as its
    n-gram proposer ({"model": "ngram"} was a draft path that "does not exist"), and one lookup bound given
    alone sets the other (3 alone is 3..3, where agentserve's defaults made it 3..5 or 2..3)."""
    for spec in ({"model": "ngram"}, {"model": "[ngram]"}, {"method": "[ngram]"}, {"method": "ngram"}):
        assert EngineConfig.from_kwargs("m", speculative_config=spec).spec.method == "ngram", spec
    for given in ({"prompt_lookup_min": 3}, {"prompt_lookup_max": 3}):
        cfg = EngineConfig.from_kwargs("m", speculative_config={"method": "ngram", **given}).spec
        assert (cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (3, 3), given


def test_cli_dotted_json_flag() -> None:
    """vLLM's JSON flags also take `--flag.key value` (docs: JSON CLI arguments); it was "unrecognized"."""
    from agentserve.cli import parse_command_line
    spec = engine_config_from_args(parse_command_line([
        "serve", "--model", "m", "--speculative-config.method", "ngram", "--speculative-config.num_speculative_tokens",
        "3", "--speculative_config.prompt_lookup_max=4"])).spec
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max) == ("ngram", 3, 4, 4)
    merged = engine_config_from_args(parse_command_line([
        "serve", "--model", "m", "--speculative-config", '{"model": "d"}', "--speculative-config.num_speculative_tokens",
        "5"])).spec
    assert (merged.draft_model, merged.num_speculative_tokens) == ("d", 5)
