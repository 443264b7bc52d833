"""GGUF load time: a quantized file's tensors dequantized by the gguf library on the CPU (numpy, one
core) and copied to the device, against the same tensors dequantized on the device from their raw
blocks (agentserve/model/gguf_dequant.py); then the whole model built from the file (build_model).

The file is written first with random blocks at a named shape in one of llama.cpp's mixes (q4_k_m:
Q6_K for output, attn_v and ffn_down, Q4_K for the other matrices; iq4_xs; iq2_xs with IQ3_S for
attn_v / ffn_down; F32 norms), so it sits in the page cache: the figures are dequantization and
copies, not the disk.

  python benchmarks/gguf_load.py [--shape llama-3.1-8b] [--layers N] [--mix q4_k_m] [--device cuda] [--out x.json]"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_result, command_line, device_name, write_json  # noqa: E402

from agentserve.model.arch_config import ArchConfig  # noqa: E402
from agentserve.model.gguf import gguf_config_dict, gguf_tensors, shared_gguf_readers  # noqa: E402
from agentserve.model.loader import build_model  # noqa: E402
from agentserve.testing.tiny import NAMED_SHAPES  # noqa: E402


# Per mix: (the type of most matrices, the type of attn_v / ffn_down), as llama.cpp's quantize picks them.
MIXES = {"q4_k_m": ("Q4_K", "Q6_K"), "iq4_xs": ("IQ4_XS", "IQ4_XS"), "iq2_xs": ("IQ2_XS", "IQ3_S")}


def _tensor_plan(arch: ArchConfig, mix: str = "q4_k_m") -> list[tuple[str, tuple[int, int] | tuple[int], str]]:
    """(GGUF name, (rows, cols) or (n,), type name) in llama.cpp's layout; output.weight Q6_K in every mix."""
    h, i, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    main, more = MIXES[mix]
    plan: list[tuple[str, Any, str]] = [("token_embd.weight", (arch.vocab_size, h), main)]
    for n in range(arch.num_layers):
        plan += [(f"blk.{n}.attn_norm.weight", (h,), "F32"), (f"blk.{n}.ffn_norm.weight", (h,), "F32"),
                 (f"blk.{n}.attn_q.weight", (arch.num_heads * d, h), main),
                 (f"blk.{n}.attn_k.weight", (arch.num_kv_heads * d, h), main),
                 (f"blk.{n}.attn_v.weight", (arch.num_kv_heads * d, h), more),
                 (f"blk.{n}.attn_output.weight", (h, arch.num_heads * d), main),
                 (f"blk.{n}.ffn_gate.weight", (i, h), main), (f"blk.{n}.ffn_up.weight", (i, h), main),
                 (f"blk.{n}.ffn_down.weight", (h, i), more)]
    plan += [("output_norm.weight", (h,), "F32"), ("output.weight", (arch.vocab_size, h), "Q6_K")]
    return plan


def write_random_gguf(arch: ArchConfig, path: Path, mix: str) -> int:
    """The file at `path`; returns its tensor bytes. Blocks are a repeated random buffer (fp16 scales
    included, so some weights are NaN: the timing does not care)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    keys = {"block_count": arch.num_layers, "context_length": arch.max_position_embeddings,
            "embedding_length": arch.hidden_size, "feed_forward_length": arch.intermediate_size,
            "attention.head_count": arch.num_heads, "attention.head_count_kv": arch.num_kv_heads,
            "rope.freq_base": float(arch.rope_theta), "attention.layer_norm_rms_epsilon": float(arch.rms_norm_eps)}
    for key, value in keys.items():
        kind = gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.UINT32
        writer.add_key_value(f"llama.{key}", value, kind)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    pool = np.random.default_rng(0).integers(0, 256, size=1 << 26, dtype=np.uint8)
    total = 0
    for name, shape, type_name in _tensor_plan(arch, mix):
        if type_name == "F32":
            writer.add_tensor(name, np.ones(shape, dtype=np.float32))
            total += 4 * int(np.prod(shape))
            continue
        qtype = gguf.GGMLQuantizationType[type_name]
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = shape
        row_bytes = cols // block_size * type_size
        raw = np.resize(pool, rows * row_bytes).reshape(rows, row_bytes)
        writer.add_tensor(name, raw, raw_dtype=qtype)
        total += raw.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return total


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(NAMED_SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's")
    ap.add_argument("--mix", default="q4_k_m", choices=sorted(MIXES), help="the file's tensor types")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy on the random blocks' NaN scales
    device = torch.device(args.device)
    shape = dict(NAMED_SHAPES[args.shape])
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    arch = ArchConfig.from_dict(shape)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "model.gguf"
        t0 = time.perf_counter()
        tensor_bytes = write_random_gguf(arch, file, args.mix)
        write_s = time.perf_counter() - t0
        params = sum(int(np.prod(s)) for _, s, _ in _tensor_plan(arch))

        def library_then_copy() -> None:  # the load before the device path: numpy, then the copy
            for _, t, _ in gguf_tensors(file, torch.device("cpu")):
                t.to(device).to(torch.bfloat16)

        def on_device() -> None:
            for _, t, _ in gguf_tensors(file, device):
                t.to(torch.bfloat16)

        with shared_gguf_readers():
            on_device()  # warm-up: kernels, the allocator, the page cache
            device_s = _timed(on_device, device)
            library_s = _timed(library_then_copy, device)
        built = ArchConfig.from_dict(gguf_config_dict(file))
        model_s = _timed(lambda: build_model(built, torch.bfloat16, device, file, "auto", 0), device)
    result = {"benchmark": "gguf_load", "device": device_name(), "shape": args.shape, "mix": args.mix,
              "layers": arch.num_layers,
              "params": params, "file_gb": tensor_bytes / 1e9, "write_s": write_s,
              "library_then_copy_s": library_s, "on_device_s": device_s, "build_model_s": model_s,
              "speedup": library_s / device_s}
    print(f"| {args.shape} ({arch.num_layers} layers, {params / 1e9:.2f}B params, {tensor_bytes / 1e9:.2f} GB "
          f"{args.mix}-like) | seconds | params/s |\n|---|---|---|")
    for label, s in [("gguf library (numpy) + copy", library_s), (f"on {device.type} (torch)", device_s),
                     ("build_model from the file", model_s)]:
        print(f"| {label} | {s:.2f} | {params / s / 1e6:.0f}M |")
    print(f"speedup {result['speedup']:.1f}x")
    write_json(result, args.out, "gguf_load")
    if device.type == "cuda":
        append_result("gguf_load", command_line("gguf_load.py", argv),
                      f"{params / 1e9:.2f}B {args.mix}-like: numpy+copy {library_s:.1f} s, on device {device_s:.2f} s "
                      f"({result['speedup']:.1f}x), build_model {model_s:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
