"""The newest (and most recently changed) Triton kernels compiled for an H100/H200 (sm_90) on this CPU machine, through Triton's
whole pipeline to a cubin: what the interpreter cannot catch (a module global read inside a kernel
failed the first H200 run of kernels/argmax.py) fails here, before device time is spent on it. The
compile runs in a fresh process without TRITON_INTERPRET (the interpreter patches triton.language
in the process that uses it). The kernels run for real in tests/test_kernels_gpu_*.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from agentserve.kernels import (argmax, fp8_linear, gemv, gemv_silu, greedy_verify, kv_gather,
                                    paged_attention)

    SM90 = GPUTarget("cuda", 90, 32)

    def build(kernel, signature, constexprs):
        out = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=SM90)
        assert out.asm["cubin"], kernel.fn.__name__
        print("compiled", kernel.fn.__name__, sorted(constexprs.items()))

    for dtype in ("fp32", "bf16"):
        build(argmax._argmax_chunk_kernel,
              {"x_ptr": "*" + dtype, "stride_row": "i32", "n_cols": "i32", "num_chunks": "i32",
               "val_ptr": "*fp32", "idx_ptr": "*i64", "CHUNK_SIZE": "constexpr"}, {"CHUNK_SIZE": argmax.CHUNK})
    build(argmax._argmax_merge_kernel,
          {"val_ptr": "*fp32", "idx_ptr": "*i64", "num_chunks": "i32", "out_ptr": "*i64",
           "CHUNKS": "constexpr", "PAST_END": "constexpr"}, {"CHUNKS": 64, "PAST_END": argmax._INDEX_PAST_END})
    for cache, fp8 in (("bf16", False), ("fp8e4nv", True)):
        build(kv_gather._gather_expand_kernel,
              {"k_cache": "*" + cache, "v_cache": "*" + cache, "slots_ptr": "*i64", "k_out": "*bf16",
               "v_out": "*bf16", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "n_tokens": "i32",
               "slot_stride": "i32", "head_stride": "i32", "GROUP": "constexpr", "HEAD_DIM": "constexpr",
               "BLOCK_D": "constexpr", "TOKENS": "constexpr", "IS_FP8": "constexpr"},
              {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_D": 128, "TOKENS": kv_gather.BLOCK_T, "IS_FP8": fp8})
    # The fma GEMVs share their K loop with the fused gate_up + silu (gemv.fma_row_sums).
    # Each over an even and a ragged K.
    silu_args = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16",
                 "M": "i32", "I": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32",
                 "HAS_SCALE": "constexpr", "HAS_BIAS": "constexpr", "BLOCK_I": "constexpr", "BLOCK_K": "constexpr",
                 "EVEN_K": "constexpr", "USE_PDL": "constexpr", "W_FIRST": "constexpr"}
    gemv_args = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32",
                 "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32", "HAS_BIAS": "constexpr",
                 "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "EVEN_K": "constexpr", "USE_PDL": "constexpr"}
    for even_k in (True, False):
        tiles = {"HAS_BIAS": False, "BLOCK_N": 4, "BLOCK_K": 1024, "EVEN_K": even_k, "USE_PDL": True}
        build(gemv._gemv_fma_kernel, gemv_args, tiles)
        # with and without the first weight chunk before the PDL wait (gemv.weights_before_wait)
        for w_first in (False, True):
            build(fp8_linear._fp8_gemv_kernel,
                  {**gemv_args, "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "W_FIRST": "constexpr"},
                  {**tiles, "W_FIRST": w_first})
        for weight in ("bf16", "fp8e4nv"):
            build(gemv_silu._gemv_silu_mul_kernel, {**silu_args, "w_ptr": "*" + weight},
                  {"HAS_SCALE": weight != "bf16", "HAS_BIAS": weight == "bf16", "BLOCK_I": 2, "BLOCK_K": 1024,
                   "EVEN_K": even_k, "USE_PDL": True, "W_FIRST": weight != "bf16"})
    build(greedy_verify._greedy_verify_kernel,
          {"greedy_ptr": "*i64", "drafts_ptr": "*i64", "accept_ptr": "*i8", "first_ptr": "*i64", "num_draft_ptr": "*i64",
           "cu_ptr": "*i32", "out_ptr": "*i64", "num_acc_ptr": "*i64", "width": "i32", "stride_out": "i32",
           "HAS_ACCEPT": "constexpr", "BLOCK_W": "constexpr"}, {"HAS_ACCEPT": True, "BLOCK_W": 8})
    # Split-KV over short multi-token queries (speculative verification: BLOCK_Q tokens per program).
    split_args = {name: "i32" for name in (
        "num_splits", "stride_qt", "stride_qh", "stride_pt", "stride_ph", "stride_ps", "stride_mt", "stride_mh",
        "stride_ms", "stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh", "stride_bt")}
    split_args.update({"part_out_ptr": "*fp32", "part_ml_ptr": "*fp32", "q_ptr": "*bf16", "k_cache_ptr": "*bf16",
                       "v_cache_ptr": "*bf16", "block_tables_ptr": "*i32", "query_start_loc_ptr": "*i32",
                       "seq_lens_ptr": "*i32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "qk_scale": "fp32"})
    consts = {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_D": 128, "PAGE_SIZE": 16, "BLOCK_M": 32, "BLOCK_N": 128,
              "PAD_D": False, "DOT_PRECISION": "tf32", "KV_FP8": False, "BLOCK_Q": 8, "USE_PDL": True}
    split_args.update({k: "constexpr" for k in consts})
    build(paged_attention._paged_attention_split_kernel, split_args, consts)
    # The unified kernel at a decode tile.
    unified_args = {name: "i32" for name in (
        "num_seqs", "stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_ks", "stride_kh",
        "stride_vb", "stride_vs", "stride_vh", "stride_bt")}
    unified_args.update({"out_ptr": "*bf16", "q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
                         "block_tables_ptr": "*i32", "query_start_loc_ptr": "*i32", "seq_lens_ptr": "*i32",
                         "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "qk_scale": "fp32"})
    consts = {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_D": 128, "PAGE_SIZE": 16, "BLOCK_M": 16, "BLOCK_Q": 4,
              "BLOCK_N": 128, "BLOCK_B": 64, "PAD_D": False, "DOT_PRECISION": "tf32", "KV_FP8": False, "USE_PDL": True}
    build(paged_attention._paged_attention_kernel, {**unified_args, **{k: "constexpr" for k in consts}}, consts)
''')


def test_new_kernels_compile_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("compiled") == 18


LOOP_SCRIPT = textwrap.dedent(r'''
    from agentserve.kernels import gemv
    from helpers.sm90_ptx import GEMV, compile_ptx, k_loop

    def report(name, body):
        text = "\n".join(body)
        wide = sum(line.startswith("ld.global.v4") for line in body)
        print(name, text.count("bar.sync") + text.count("st.shared") + text.count("stmatrix"),
              wide == text.count("ld.global"))

    tile = {"HAS_BIAS": False, "BLOCK_N": 4, "BLOCK_K": 1024, "EVEN_K": True, "USE_PDL": True}
    report("bf16", k_loop(compile_ptx(gemv._gemv_fma_kernel, GEMV, tile, 4)))
''')


def test_gemv_k_loop_has_no_barrier() -> None:
    """The bf16 GEMV's K loop compiles to a loop without a barrier or a shared-memory store, all its global
    loads 16 bytes wide: a layout conversion of x inside the loop (what the FP8 loop has with more than one
    warp, benchmarks/gemv_loop_ptx.py) would put them there."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),  # tests/helpers/sm90_ptx.py
                                         *filter(None, [env.get("PYTHONPATH")])])
    run = subprocess.run([sys.executable, "-c", LOOP_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line.split() for line in run.stdout.splitlines()]
    assert lines == [["bf16", "0", "True"]], run.stdout
