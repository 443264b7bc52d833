"""FP8 weights on the CPU engine: online quantization (quantization="fp8") and pre-quantized
checkpoints written here on the fly the way their formats store them (compressed-tensors FP8 with
channel or tensor scales, dynamic or static activations; Hugging Face fine-grained FP8 with block
scales), plus the errors for schemes that are not supported.

On the CPU a layer computes dequantize-then-matmul, so an FP8 model must give exactly what the
same engine gives on a 16-bit checkpoint holding the dequantized weights: greedy tokens and
logprobs are compared for equality there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from agentserve import SamplingParams
from agentserve.kernels.fp8_linear import dequantize_weight
from agentserve.kernels.fp8_utils import FP8_DTYPE, to_fp8_saturated
from agentserve.llm import LLM
from agentserve.model.arch_config import ModelLoadError
from agentserve.model.fp8 import Fp8LinearMethod
from agentserve.model.linear import LinearBase
from agentserve.model.quant import UnquantizedLinearMethod
from agentserve.testing import tiny_model_cached
from helpers.fp8_checkpoints import (Tensors, block_quantizer, channel_quantizer, compressed_tensors_config,
                                     tensor_quantizer, write_checkpoints)

PROMPTS = ["The quick brown fox", "def fibonacci(n):\n    if n < 2:", "In a distant galaxy, a small robot"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, logprobs=2)

DYNAMIC_TOKEN = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
STATIC_TENSOR = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def generate(path: Path, **kwargs: Any) -> tuple[list[list[int]], list[list[float]], LLM]:
    llm = LLM(str(path), num_blocks=64, **kwargs)
    outs = llm.generate(PROMPTS, GREEDY)
    tokens = [o.outputs[0].token_ids for o in outs]
    logprobs = [[p[t].logprob for p, t in zip(o.outputs[0].logprobs or [], o.outputs[0].token_ids)] for o in outs]
    return tokens, logprobs, llm


def _linear_layers(llm: LLM) -> dict[str, LinearBase]:
    return {n: m for n, m in llm.engine.runner.model.named_modules() if isinstance(m, LinearBase)}


def _assert_same_outputs(a: Path, b: Path, **kwargs: Any) -> LLM:
    tokens_a, logprobs_a, llm_a = generate(a, **kwargs)
    tokens_b, logprobs_b, llm_b = generate(b)
    llm_b.close()
    assert tokens_a == tokens_b
    assert logprobs_a == logprobs_b
    return llm_a


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_online_fp8_equals_dequantized_checkpoint(arch: str, tmp_path: Path) -> None:
    """quantization="fp8" on a 16-bit checkpoint: per-channel e4m3 weights whose dequantized values
    are what the engine computes with (qwen2: the qkv bias stays in the model dtype)."""
    src = tiny_model_cached(arch)
    _, deq = write_checkpoints(src, tmp_path, channel_quantizer(torch.float32), None)
    with _assert_same_outputs(src, deq, quantization="fp8") as llm:
        layers = _linear_layers(llm)
        assert len(layers) == 4 * llm.engine.arch.num_layers
        for layer in layers.values():
            assert isinstance(layer.quant_method, Fp8LinearMethod)
            assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale.shape == (layer.weight.shape[0],)
        assert llm.engine.runner.model.lm_head.weight.dtype == torch.float32  # lm_head stays unquantized


def test_compressed_tensors_channel_dynamic(tmp_path: Path) -> None:
    fp8, deq = write_checkpoints(tiny_model_cached("llama"), tmp_path, channel_quantizer(torch.bfloat16),
                                 compressed_tensors_config("channel", DYNAMIC_TOKEN))
    with _assert_same_outputs(fp8, deq) as llm:  # read as FP8 without any quantization option
        assert all(layer.weight.dtype == FP8_DTYPE for layer in _linear_layers(llm).values())


def test_compressed_tensors_tensor_scales_expand_per_shard(tmp_path: Path) -> None:
    """Per-tensor scales: each projection of a fused layer keeps its own scale."""
    fp8, deq = write_checkpoints(tiny_model_cached("llama"), tmp_path, tensor_quantizer(False),
                                 compressed_tensors_config("tensor", DYNAMIC_TOKEN))
    with _assert_same_outputs(fp8, deq) as llm:
        qkv = llm.engine.runner.model.layers[0].self_attn.qkv_proj
        sizes = qkv.output_partition_sizes
        assert len(set(qkv.weight_scale.split(sizes)[i][0].item() for i in range(3))) == 3


def test_compressed_tensors_static_activations(tmp_path: Path) -> None:
    fp8, deq = write_checkpoints(tiny_model_cached("llama"), tmp_path, tensor_quantizer(True),
                                 compressed_tensors_config("tensor", STATIC_TENSOR))
    with LLM(str(fp8), num_blocks=64) as llm:
        layer = llm.engine.runner.model.layers[0].self_attn.qkv_proj
        expected = max(0.01 + 0.001 * len(f"model.layers.0.self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj"))
        assert layer.input_scale.shape == (1,) and abs(float(layer.input_scale) - expected) < 1e-7
        # The static scale rounds the activations: the layer output is the dequantized product of
        # e4m3(x / s) * s with the weights, not of x itself.
        x = torch.randn(3, layer.input_size_per_partition)
        xq = to_fp8_saturated(x / layer.input_scale).float() * layer.input_scale
        w = dequantize_weight(layer.weight, layer.weight_scale)
        torch.testing.assert_close(layer(x), xq @ w.t())
        assert not torch.allclose(layer(x), x @ w.t())
        out = llm.generate(PROMPTS[:1], GREEDY)[0].outputs[0]
        assert len(out.token_ids) == GREEDY.max_tokens


def test_fine_grained_block_scales(tmp_path: Path) -> None:
    """Hugging Face "fp8" with weight_block_size (16 x 32 here, so the tiny model's 64 x 128
    projections have several blocks each way): requantized per channel at load, within one e4m3
    rounding of the checkpoint's block-dequantized weights."""
    block = (16, 32)
    fp8, deq = write_checkpoints(tiny_model_cached("llama"), tmp_path, block_quantizer(block),
                                 {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                  "weight_block_size": list(block)})
    deq_tensors = load_file(str(deq / "model.safetensors"))
    with LLM(str(fp8), num_blocks=64) as llm:
        layer = llm.engine.runner.model.layers[1].mlp.gate_up_proj
        want = torch.cat([deq_tensors["model.layers.1.mlp.gate_proj.weight"],
                          deq_tensors["model.layers.1.mlp.up_proj.weight"]])
        got = dequantize_weight(layer.weight, layer.weight_scale)
        bound = want.abs().amax(1, keepdim=True) * 2.0 ** -4 + 1e-9  # half a step of each row's top binade
        assert ((got - want).abs() <= bound).all()
        assert not hasattr(layer, "weight_scale_inv")
        assert llm.generate(PROMPTS[:1], GREEDY)[0].outputs[0].token_ids


def test_ignored_modules_stay_unquantized(tmp_path: Path) -> None:
    def quantize_but_down(name: str, w: torch.Tensor) -> tuple[Tensors, torch.Tensor]:
        if ".down_proj." in name:
            return {name: w}, w
        return channel_quantizer(torch.float32)(name, w)

    fp8, deq = write_checkpoints(tiny_model_cached("llama"), tmp_path, quantize_but_down,
                                 compressed_tensors_config("channel", DYNAMIC_TOKEN, ignore=("lm_head", "re:.*down_proj")))
    with _assert_same_outputs(fp8, deq) as llm:
        for name, layer in _linear_layers(llm).items():
            unquantized = name.endswith("down_proj")
            assert isinstance(layer.quant_method, UnquantizedLinearMethod) == unquantized, name


@pytest.mark.parametrize("qc,needle", [
    ({"quant_method": "awq", "bits": 4}, "quant_method 'awq'"),
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq'"),
    (compressed_tensors_config("group", None) | {"config_groups": {"g": {"weights": {
        "num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}}, "int4 group"),
    (compressed_tensors_config("channel", {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}),
     "activations int8 token"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, "block scales"),
])
def test_unsupported_schemes_are_named(qc: dict[str, Any], needle: str, tmp_path: Path) -> None:
    src = tiny_model_cached("llama")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config | {"quantization_config": qc}))
    with pytest.raises(ModelLoadError, match="unsupported quantization scheme") as err:
        LLM(str(dst), num_blocks=16)
    assert needle in str(err.value)


def test_unknown_quantization_option_is_refused() -> None:
    with pytest.raises(ValueError, match="quantization"):
        LLM(str(tiny_model_cached("llama")), quantization="int4")
