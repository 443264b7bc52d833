"""Activations quantized by the kernels that produce them (kernels/rmsnorm.py rms_norm_fp8_out,
kernels/activation.py silu_and_mul_fp8_out, offered to kernels/fp8_linear.py): in Triton's
interpreter each fused kernel gives bitwise the 16-bit output and the per-token e4m3 quantization
that the unfused pair (the norm or SiLU-mul, then quantize_per_token_triton) gives; an offer is taken
only by the same tensor and never outlives the next FP8 linear call; FP8 models mark exactly the
producers whose consumer quantizes its input dynamically. (On the GPU, tests/test_kernels_gpu_fp8.py
runs a model forward with and without the marks.)"""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import fp8_linear as fl  # noqa: E402
from agentserve.kernels.activation import silu_and_mul_fp8_out, silu_and_mul_triton  # noqa: E402
from agentserve.kernels.rmsnorm import rms_norm_fp8_out, rms_norm_triton  # noqa: E402
from agentserve.model.arch_config import ArchConfig  # noqa: E402
from agentserve.model.fp8 import quantize_activations_at_their_producers, quantize_linear_layers  # noqa: E402
from agentserve.model.llama import CausalLM  # noqa: E402
from agentserve.model.quant_config import Fp8Config  # noqa: E402
from agentserve.testing import tiny_model_cached  # noqa: E402

_INTERPRETED = type(fl._quant_per_token_kernel).__name__ == "InterpretedFunction"
interpreted = pytest.mark.skipif(
    not _INTERPRETED, reason="needs triton with TRITON_INTERPRET=1 set before the kernels are imported")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == fl.FP8_DTYPE else torch.equal(a, b)


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [96, 256])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp8_out_is_the_norm_then_the_quantizer(dtype: torch.dtype, hidden: int, with_residual: bool) -> None:
    g = torch.Generator().manual_seed(hidden + with_residual)
    x = (torch.randn(5, hidden, generator=g) * 3).to(dtype)
    x[2] = 0  # an all-zero row: the smallest scale, zeros out
    residual = torch.randn(5, hidden, generator=g).to(dtype) if with_residual else None
    weight = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    out, new_residual, out_q, out_scale = rms_norm_fp8_out(x, weight, 1e-6, residual)
    ref_out, ref_residual = rms_norm_triton(x, weight, 1e-6, residual)
    ref_q, ref_scale = fl.quantize_per_token_triton(ref_out)
    _same_bits(out, ref_out)
    _same_bits(new_residual, ref_residual)
    _same_bits(out_q, ref_q)
    _same_bits(out_scale, ref_scale)


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inter", [96, 3000])  # 3000: two 2048-wide chunks, the second ragged
def test_silu_and_mul_fp8_out_is_silu_mul_then_the_quantizer(dtype: torch.dtype, inter: int) -> None:
    g = torch.Generator().manual_seed(inter)
    x = (torch.randn(4, 2 * inter, generator=g) * 4).to(dtype)
    out, out_q, out_scale = silu_and_mul_fp8_out(x)
    ref_out = silu_and_mul_triton(x)
    ref_q, ref_scale = fl.quantize_per_token_triton(ref_out)
    _same_bits(out, ref_out)
    _same_bits(out_q, ref_q)
    _same_bits(out_scale, ref_scale)


def test_an_offer_is_taken_by_the_same_tensor_only_and_never_outlives_the_next_call() -> None:
    x = torch.randn(3, 16)
    q, s = fl.quantize_per_token_ref(x)
    fl.offer_quantized_input(x, q, s)
    assert fl._take_offered(x[:2]) is None  # a view is another tensor
    assert fl._offered is None  # and the attempt emptied the slot
    fl.offer_quantized_input(x, q, s)
    taken = fl._take_offered(x)
    assert taken is not None and taken[0] is q and taken[1] is s
    wq, ws = fl.quantize_weight_per_channel(torch.randn(8, 16))
    fl.offer_quantized_input(x, q, s)
    fl.fp8_linear(torch.randn(3, 16), wq, ws)  # another input: the offer is dropped, not kept
    assert fl._offered is None


def test_producers_are_never_asked_to_quantize_off_cuda() -> None:
    assert not fl.wants_quantized_input(torch.zeros(8, 16, dtype=torch.bfloat16))


def _fp8_model(config: Fp8Config) -> CausalLM:
    arch = ArchConfig.from_dir(Path(tiny_model_cached("llama3")))
    model = CausalLM(arch)
    quantize_linear_layers(model, config)
    return model


def test_fp8_models_mark_the_producers_of_dynamically_quantized_inputs() -> None:
    model = _fp8_model(Fp8Config(checkpoint_fp8=False, weight_strategy="channel"))
    layers = len(model.layers)
    assert quantize_activations_at_their_producers(model) == 3 * layers
    for decoder in model.layers:
        assert decoder.input_layernorm.fp8_output and decoder.post_attention_layernorm.fp8_output
        assert decoder.mlp.fp8_down_input
    assert not model.norm.fp8_output  # the lm_head stays 16-bit


def test_static_activation_scales_and_ignored_layers_mark_nothing_they_feed() -> None:
    static = _fp8_model(Fp8Config(checkpoint_fp8=False, weight_strategy="channel", static_activations=True))
    assert quantize_activations_at_their_producers(static) == 0
    ignored = _fp8_model(Fp8Config(checkpoint_fp8=False, weight_strategy="channel",
                                   ignore=("re:.*mlp.down_proj",)))
    assert quantize_activations_at_their_producers(ignored) == 2 * len(ignored.layers)
    assert not any(d.mlp.fp8_down_input for d in ignored.layers)
