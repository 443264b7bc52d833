"""FP8 checkpoints written on the fly the way their formats store them (for tests/test_fp8_*.py):
a tiny model's projections quantized by a `Quantizer`, next to a 16-bit copy holding exactly the
dequantized weights (what the CPU engine must reproduce)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from agentserve.kernels.fp8_linear import dequantize_weight, quantize_weight_per_channel
from agentserve.kernels.fp8_utils import to_fp8_saturated

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Tensors = dict[str, torch.Tensor]
# (checkpoint name, fp32 weight) -> (tensors to store in place of it, its dequantized weight)
Quantizer = Callable[[str, torch.Tensor], tuple[Tensors, torch.Tensor]]


def is_projection(name: str) -> bool:
    return name.endswith(".weight") and any(f".{p}." in name for p in PROJECTIONS)


def write_checkpoints(src: Path, dst: Path, quantizer: Quantizer, quantization_config: Optional[dict[str, Any]],
                      quantized_tensor: Callable[[str], bool] = is_projection,
                      extra_tensors: Optional[Tensors] = None) -> tuple[Path, Path]:
    """Two copies of the tiny model `src`: dst/fp8 with its projections (the tensors `quantized_tensor`
    picks) stored by `quantizer` and `quantization_config` in config.json, and dst/deq with the
    dequantized weights in fp32; both with `extra_tensors` (KV-cache scales, say)."""
    tensors: Tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    quantized, dequantized = dict(extra_tensors or {}), dict(extra_tensors or {})
    for name, t in tensors.items():
        if quantized_tensor(name):
            stored, deq = quantizer(name, t.float())
            quantized.update(stored)
            dequantized[name] = deq.float().contiguous()
        else:
            quantized[name] = dequantized[name] = t
    out = []
    for sub, weights, qc in (("fp8", quantized, quantization_config), ("deq", dequantized, None)):
        d = dst / sub
        d.mkdir(parents=True)
        for f in src.iterdir():
            if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
                shutil.copy(f, d / f.name)
        config = json.loads((src / "config.json").read_text())
        if qc is not None:
            config["quantization_config"] = qc
        (d / "config.json").write_text(json.dumps(config))
        save_file(weights, str(d / "model.safetensors"))
        out.append(d)
    return out[0], out[1]


def channel_quantizer(scale_dtype: torch.dtype) -> Quantizer:
    def q(name: str, w: torch.Tensor) -> tuple[Tensors, torch.Tensor]:
        wq, s = quantize_weight_per_channel(w)
        s = s.to(scale_dtype)
        base = name[:-len(".weight")]
        return {name: wq, f"{base}.weight_scale": s[:, None]}, dequantize_weight(wq, s)
    return q


def tensor_quantizer(static_input: bool) -> Quantizer:
    def q(name: str, w: torch.Tensor) -> tuple[Tensors, torch.Tensor]:
        s = w.abs().max() / 448.0
        wq = to_fp8_saturated(w / s)
        base = name[:-len(".weight")]
        stored = {name: wq, f"{base}.weight_scale": s.reshape(1)}
        if static_input:
            # Calibrated input scales differ per projection; the engine quantizes x once with the largest.
            stored[f"{base}.input_scale"] = torch.tensor([0.01 + 0.001 * len(base)])
        return stored, wq.float() * s
    return q


def block_quantizer(block: tuple[int, int], requantized: bool = False) -> Quantizer:
    """Fine-grained FP8 (`weight_scale_inv` per block; partial blocks at the edges). `requantized`:
    the dequantized weight the engine serves an FP8 layer with, the block-dequantized weight rounded
    once more per output channel (model/fp8.py); else the block-dequantized weight itself (what a
    layer served unquantized computes with)."""
    bn, bk = block

    def q(name: str, w: torch.Tensor) -> tuple[Tensors, torch.Tensor]:
        n, k = w.shape
        nb, kb = -(-n // bn), -(-k // bk)
        padded = torch.zeros(nb * bn, kb * bk)
        padded[:n, :k] = w
        tiles = padded.view(nb, bn, kb, bk)
        scale_inv = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # [nb, kb]
        wq = to_fp8_saturated(tiles / scale_inv[:, None, :, None]).view(nb * bn, kb * bk)[:n, :k].contiguous()
        full = scale_inv.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        deq = wq.float() * full
        if requantized:
            deq = dequantize_weight(*quantize_weight_per_channel(deq))
        return {name: wq, f"{name}_scale_inv": scale_inv}, deq
    return q


def compressed_tensors_config(weight_strategy: str, activations: Optional[dict[str, Any]],
                              ignore: tuple[str, ...] = ("lm_head",)) -> dict[str, Any]:
    """quantization_config as llm-compressor writes it for an FP8 scheme (one group for every Linear)."""
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": list(ignore),
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": activations,
                                          "weights": {"num_bits": 8, "type": "float", "strategy": weight_strategy,
                                                      "dynamic": False, "symmetric": True}}}}
