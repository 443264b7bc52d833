"""FP8 checkpoints laid out the way published ones are, built here from tiny models: each loads and
gives exactly the greedy tokens of the engine's unquantized path on the weights it dequantizes to
(on the CPU an FP8 layer computes dequantize-then-matmul), or fails at start-up naming what is not
supported.

- compressed-tensors (llm-compressor; RedHat / NeuralMagic "FP8-dynamic" and "FP8"): the forms of
  `ignore` ("lm_head", "re:.*lm_head", "re:.*mlp.gate$"), per-group `format`, `targets` that leave
  the attention in 16 bits, a quantized lm_head, `kv_cache_scheme` with k_scale / v_scale tensors
  (also without weight quantization), and the integer / packed / asymmetric schemes that are errors;
- Hugging Face fine-grained FP8 (Qwen3 "-FP8", DeepSeek): 128x128 blocks over shapes that are not
  multiples of 128, `modules_to_not_convert` naming whole modules (transformers matches substrings)
  or one projection of a fused layer;
- Meta's "fbgemm_fp8" (attention left in bf16 through modules_to_not_convert);
- quantization="fp8" on a pre-quantized checkpoint, kv_cache_dtype="fp8" with checkpoint scales.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from agentserve import SamplingParams
from agentserve.kernels.fp8_utils import FP8_DTYPE
from agentserve.llm import LLM
from agentserve.model.arch_config import ModelLoadError
from agentserve.model.fp8 import Fp8LinearMethod
from agentserve.model.linear import LinearBase
from agentserve.model.quant import UnquantizedLinearMethod
from agentserve.testing import tiny_model_cached
from helpers.fp8_checkpoints import (Quantizer, Tensors, block_quantizer, channel_quantizer, compressed_tensors_config,
                                     is_projection, tensor_quantizer, write_checkpoints)

PROMPTS = ["The quick brown fox", "def fibonacci(n):\n    if n < 2:", "In a distant galaxy, a small robot"]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
DYNAMIC_TOKEN = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
FP8_KV = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def _tokens(path: Path, **kwargs: Any) -> list[list[int]]:
    with LLM(str(path), num_blocks=64, **kwargs) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def _methods(path: Path, **kwargs: Any) -> dict[str, type]:
    with LLM(str(path), num_blocks=16, **kwargs) as llm:
        return {n: type(m.quant_method) for n, m in llm.engine.runner.model.named_modules() if isinstance(m, LinearBase)}


def _only(select: Callable[[str], bool], quantizer: Quantizer) -> Quantizer:
    """`quantizer` for the tensors `select` picks; the others stay as they are (16-bit)."""
    def q(name: str, w: torch.Tensor) -> tuple[Tensors, torch.Tensor]:
        return quantizer(name, w) if select(name) else ({name: w}, w)
    return q


@pytest.mark.parametrize("ignore,fmt,group_format", [
    (("lm_head",), "float-quantized", None),
    (("re:.*lm_head",), "naive-quantized", None),
    (("re:.*lm_head", "re:.*mlp.gate$"), "mixed-precision", "float-quantized"),  # newer: a format per group
])
def test_compressed_tensors_ignore_and_format_forms(ignore: tuple[str, ...], fmt: str, group_format: Any,
                                                    tmp_path: Path) -> None:
    qc = compressed_tensors_config("channel", DYNAMIC_TOKEN, ignore=ignore) | {"format": fmt}
    if group_format is not None:
        qc["config_groups"]["group_0"]["format"] = group_format
    fp8, deq = write_checkpoints(tiny_model_cached("llama"), tmp_path, channel_quantizer(torch.bfloat16), qc)
    assert _tokens(fp8) == _tokens(deq)
    assert set(_methods(fp8).values()) == {Fp8LinearMethod}


def test_compressed_tensors_quantized_lm_head_is_dequantized(tmp_path: Path) -> None:
    """`ignore: []` quantizes the lm_head too: its e4m3 weight must not be cast to the model dtype
    without its scale (that served garbage); the lm_head stays in the model dtype, dequantized."""
    fp8, deq = write_checkpoints(tiny_model_cached("llama"), tmp_path, channel_quantizer(torch.float32),
                                 compressed_tensors_config("channel", DYNAMIC_TOKEN, ignore=()),
                                 quantized_tensor=lambda n: is_projection(n) or n == "lm_head.weight")
    assert load_file(str(fp8 / "model.safetensors"))["lm_head.weight"].dtype == FP8_DTYPE
    assert _tokens(fp8) == _tokens(deq)


def test_compressed_tensors_targets_leave_attention_in_16_bits(tmp_path: Path) -> None:
    """targets ["re:.*mlp.*"]: the attention projections are bf16 with no scales (a layer is FP8
    where the checkpoint has its weight_scale, whatever the targets / ignore patterns say)."""
    qc = compressed_tensors_config("tensor", DYNAMIC_TOKEN)
    qc["config_groups"]["group_0"]["targets"] = ["re:.*mlp.*proj"]
    fp8, deq = write_checkpoints(tiny_model_cached("qwen2"), tmp_path,
                                 _only(lambda n: ".mlp." in n, tensor_quantizer(False)), qc)
    assert _tokens(fp8) == _tokens(deq)
    methods = _methods(fp8)
    assert {n for n, m in methods.items() if m is Fp8LinearMethod} == {n for n in methods if ".mlp." in n}


def test_hf_fine_grained_partial_blocks_and_modules_to_not_convert(tmp_path: Path) -> None:
    """Qwen3 "-FP8" style: 128x128 blocks over 64-, 200- and 256-wide projections (partial last
    blocks); modules_to_not_convert names a whole module ("model.layers.0.mlp", a substring of its
    projections' names, as transformers matches it) and one projection of a fused layer (layer 1's
    q_proj: its k / v are FP8, so the fused qkv is served unquantized with k / v dequantized)."""
    src = tiny_model_cached("qwen3", intermediate_size=200)
    block = (128, 128)
    served_fp8 = block_quantizer(block, requantized=True)
    dequantized_only = block_quantizer(block)

    def quantize(name: str, w: torch.Tensor) -> tuple[Tensors, torch.Tensor]:
        if "layers.0.mlp." in name or "layers.1.self_attn.q_proj" in name:
            return {name: w}, w
        if "layers.1.self_attn." in name and (".k_proj." in name or ".v_proj." in name):
            return dequantized_only(name, w)
        return served_fp8(name, w)

    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": list(block),
          "modules_to_not_convert": ["lm_head", "model.layers.0.mlp", "model.layers.1.self_attn.q_proj"]}
    fp8, deq = write_checkpoints(src, tmp_path, quantize, qc)
    assert _tokens(fp8) == _tokens(deq)
    methods = _methods(fp8)
    unquantized = {n for n, m in methods.items() if m is UnquantizedLinearMethod}
    assert unquantized == {"layers.0.mlp.gate_up_proj", "layers.0.mlp.down_proj", "layers.1.self_attn.qkv_proj"}


def test_fbgemm_fp8_with_attention_left_in_bf16(tmp_path: Path) -> None:
    """Meta's Llama 3.1 FP8 config: per-channel scales [n, 1], the attention projections and the
    lm_head listed in modules_to_not_convert (bf16 in the checkpoint)."""
    src = tiny_model_cached("llama3")
    skipped = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    qc = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": skipped + ["lm_head"]}
    fp8, deq = write_checkpoints(src, tmp_path, _only(lambda n: ".mlp." in n, channel_quantizer(torch.float32)), qc)
    assert _tokens(fp8) == _tokens(deq)


def test_quantization_option_on_a_prequantized_checkpoint(tmp_path: Path) -> None:
    """quantization="fp8" on an FP8 checkpoint reads it as its config says (vLLM accepts the same
    method); on a checkpoint of another method it is the error naming that method."""
    fp8, deq = write_checkpoints(tiny_model_cached("llama"), tmp_path, channel_quantizer(torch.float32),
                                 compressed_tensors_config("channel", DYNAMIC_TOKEN))
    assert _tokens(fp8, quantization="fp8") == _tokens(deq)
    awq = tmp_path / "awq"
    shutil.copytree(deq, awq)
    config = json.loads((awq / "config.json").read_text())
    (awq / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "awq", "bits": 4}}))
    with pytest.raises(ModelLoadError, match="quant_method 'awq'"):
        LLM(str(awq), quantization="fp8", num_blocks=16)


def _kv_scales(num_layers: int) -> Tensors:
    """Per-layer KV scales in the namings checkpoints use (compressed-tensors, per head, AutoFP8's one
    kv_scale for both)."""
    scales: Tensors = {"model.layers.0.self_attn.k_scale": torch.tensor(0.02),
                       "model.layers.0.self_attn.v_scale": torch.tensor([0.001, 0.003])}
    for i in range(1, num_layers):
        scales[f"model.layers.{i}.self_attn.kv_scale"] = torch.tensor([0.01 * i])
    return scales


def _attention_scales(llm: LLM) -> list[tuple[float, float]]:
    return [(float(layer.self_attn.k_scale), float(layer.self_attn.v_scale)) for layer in llm.engine.runner.model.layers]


def test_fp8_kv_cache_with_and_without_checkpoint_scales(tmp_path: Path) -> None:
    """kv_cache_scheme with k_scale / v_scale tensors: read as they are with kv_cache_dtype="fp8"
    (tokens those of the unquantized weights with the same scales), unused with 16-bit pages; a
    KV-only checkpoint (no config_groups) keeps its weights in 16 bits."""
    src = tiny_model_cached("llama")
    qc = compressed_tensors_config("channel", DYNAMIC_TOKEN) | {"kv_cache_scheme": FP8_KV}
    fp8, deq = write_checkpoints(src, tmp_path, channel_quantizer(torch.float32), qc, extra_tensors=_kv_scales(2))
    with LLM(str(fp8), num_blocks=64, kv_cache_dtype="fp8") as llm:
        assert [s for pair in _attention_scales(llm) for s in pair] == pytest.approx([0.02, 0.003, 0.01, 0.01])
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert got == _tokens(deq, kv_cache_dtype="fp8")
    plain = tmp_path / "deq_without_kv_scales"
    shutil.copytree(deq, plain)
    save_file({n: t for n, t in load_file(str(deq / "model.safetensors")).items() if "_scale" not in n},
              str(plain / "model.safetensors"))
    assert _tokens(fp8) == _tokens(plain)  # 16-bit pages: the scales are not applied
    kv_only = tmp_path / "kv_only"
    shutil.copytree(deq, kv_only)
    config = json.loads((kv_only / "config.json").read_text())
    (kv_only / "config.json").write_text(json.dumps(config | {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "dense", "config_groups": {}, "kv_cache_scheme": FP8_KV}}))
    assert set(_methods(kv_only).values()) == {UnquantizedLinearMethod}
    assert _tokens(kv_only, kv_cache_dtype="fp8") == got
    # Scales for some layers only: the others would keep scale 1 (neither calibrated nor the checkpoint's).
    save_file({n: t for n, t in load_file(str(deq / "model.safetensors")).items() if "layers.1.self_attn.kv" not in n},
              str(kv_only / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"KV-cache scales for some layers but not for "
                                             r"\['layers.1.self_attn.k_scale', 'layers.1.self_attn.v_scale'\]"):
        LLM(str(kv_only), num_blocks=16, kv_cache_dtype="fp8")


def _with_config(src: Path, dst: Path, qc: dict[str, Any]) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config | {"quantization_config": qc}))
    return dst


INT4_W4A16 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True}
INT8 = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}
FP8_CHANNEL = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}
# llm-compressor's 2:4 sparse models (RedHatAI "Sparse-...-2of4-FP8-dynamic"): the weights stored as
# their nonzero halves plus bitmasks, under names no dense layer reads.
SPARSE_24_BITMASK = {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "global_sparsity": 0.45,
                     "targets": ["Linear"], "ignore": ["lm_head"]}


def _ct(weights: dict[str, Any], acts: Any, fmt: str, **extra: Any) -> dict[str, Any]:
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"], **extra,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}}


@pytest.mark.parametrize("qc,needle", [
    (_ct(INT4_W4A16, None, "pack-quantized"), "weights int4 group, activations none, format pack-quantized"),
    (_ct(INT8, {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}, "int-quantized"),
     "weights int8 channel, activations int8 token dynamic"),
    (_ct(FP8_CHANNEL | {"strategy": "group", "group_size": 128}, DYNAMIC_TOKEN, "float-quantized"), "float8 group"),
    (_ct(FP8_CHANNEL | {"symmetric": False}, DYNAMIC_TOKEN, "float-quantized"), "float8 channel asymmetric"),
    (_ct(FP8_CHANNEL, DYNAMIC_TOKEN, "dense"), "format dense"),
    (_ct(FP8_CHANNEL, DYNAMIC_TOKEN, "float-quantized", kv_cache_scheme=INT8), "kv_cache_scheme int8"),
    (_ct(FP8_CHANNEL, DYNAMIC_TOKEN, "float-quantized", sparsity_config=SPARSE_24_BITMASK),
     "sparsity format 'sparse-24-bitmask' (2:4)"),
    ({"quant_method": "compressed-tensors", "config_groups": {}, "sparsity_config": SPARSE_24_BITMASK},
     "sparsity format 'sparse-24-bitmask'"),
    ({"quant_method": "fp8", "fmt": "e5m2", "activation_scheme": "dynamic"}, "'e5m2'"),
    ({"quant_method": "modelopt", "quant_algo": "FP8"}, "quant_method 'modelopt'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes'"),
])
def test_unsupported_schemes_fail_at_start_up_naming_them(qc: dict[str, Any], needle: str, tmp_path: Path) -> None:
    dst = _with_config(tiny_model_cached("llama"), tmp_path / "m", qc)
    with pytest.raises(ModelLoadError, match="unsupported quantization scheme") as err:
        LLM(str(dst), num_blocks=16)
    assert needle in str(err.value)


@pytest.mark.parametrize("name,legacy,needle", [
    ("quantize_config.json", {"bits": 4, "group_size": 128, "desc_act": False}, "'gptq' in the checkpoint's quantize_config.json"),
    ("quant_config.json", {"quant_method": "awq", "w_bit": 4, "q_group_size": 128}, "'awq'"),
])
def test_legacy_quantize_config_files_name_their_scheme(name: str, legacy: dict[str, Any], needle: str,
                                                        tmp_path: Path) -> None:
    """AutoGPTQ / AutoAWQ-era checkpoints keep their scheme beside config.json: refused naming it (the load
    failed on missing weights instead, after warnings about every qweight / scales tensor)."""
    dst = tmp_path / "m"
    shutil.copytree(tiny_model_cached("llama"), dst)
    (dst / name).write_text(json.dumps(legacy))
    with pytest.raises(ModelLoadError, match="unsupported quantization scheme") as err:
        LLM(str(dst), num_blocks=16)
    assert needle in str(err.value)


def test_sparsity_config_with_dense_storage_loads_its_fp8_weights(tmp_path: Path) -> None:
    """A 2:4 sparsity_config whose format is "dense" stores ordinary weights (zeros included): they
    serve as any FP8 checkpoint's."""
    qc = compressed_tensors_config("channel", DYNAMIC_TOKEN) | {"sparsity_config": SPARSE_24_BITMASK | {"format": "dense"}}
    fp8, deq = write_checkpoints(tiny_model_cached("llama"), tmp_path, channel_quantizer(torch.bfloat16), qc)
    assert _tokens(fp8) == _tokens(deq)
    sparse_only = _with_config(deq, tmp_path / "sparse_only", {"quant_method": "compressed-tensors", "config_groups": {},
                                                               "sparsity_config": qc["sparsity_config"]})
    assert set(_methods(sparse_only).values()) == {UnquantizedLinearMethod}


def test_fp8_tensors_without_scales_are_an_error(tmp_path: Path) -> None:
    """e4m3 weights whose scales are missing (or named for another format) cannot be served; nor can
    an e4m3 tensor in a checkpoint whose config.json declares no FP8 quantization."""
    fp8, _ = write_checkpoints(tiny_model_cached("llama"), tmp_path, channel_quantizer(torch.float32),
                               compressed_tensors_config("channel", DYNAMIC_TOKEN))
    tensors = load_file(str(fp8 / "model.safetensors"))
    renamed = {n.replace(".weight_scale", ".weight_scale_inv") if "layers.1.mlp.up_proj" in n else n: t
               for n, t in tensors.items()}
    save_file(renamed, str(fp8 / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"FP8 tensors without a weight_scale in the checkpoint: "
                                             r"\['model.layers.1.mlp.up_proj.weight'\]"):
        LLM(str(fp8), num_blocks=16)
    config = json.loads((fp8 / "config.json").read_text())
    del config["quantization_config"]
    (fp8 / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="is torch.float8_e4m3fn, but config.json has no FP8 quantization_config"):
        LLM(str(fp8), num_blocks=16)
