#!/usr/bin/env bash
# Everything the GPU issues measure, in one command on the benchmark machine:
#   bash benchmarks/gpu_suite.sh [quick|full|bench|kernels|fastpath|pending|pdl|diag|next|next-bench|spec-ab|lora-side|next5|next5-bench|next5-extra|next6|next6-bench|next7|next8|next9]
# kernels: the GPU kernel tests (with per-test durations), the gemv + elementwise kernel sections, and
# the batch-1 decode step with AGENTSERVE_GEMV=torch vs triton (GPU time per step): one device call,
# about 5-7 minutes on a fresh H100 (most of it Triton compiles and the two 8B dummy model builds);
# KERNELS_LATENCY=1 adds benchmarks/latency.py for both GEMV modes.
# Installs the offline wheels (.whl/, from ../shared/gpu/wheels.sh), runs `pytest -m gpu`, then every
# benchmark; JSON goes under $OUT (default benchmarks/out), a summary table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}
OUT=${OUT:-benchmarks/out}; export OUT; mkdir -p "$OUT"
export TRITON_INTERPRET=0
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || export PYTHONPATH=$PYTHONPATH:$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run() { local name=$1; shift; echo "=== $name: $*"; local t0=$SECONDS; timeout "${TMO:-900}" "$@" 2>&1 | grep -v "it/s\]" | tail -n 40; echo "--- $name took $((SECONDS - t0)) s"; }
DUMMY="--model llama-3.1-8b --load-format dummy --dtype bfloat16"
if [ "$MODE" = kernels ]; then
  run pytest-kernels-gpu python3 -m pytest -m gpu -q -p no:cacheprovider --durations=15 tests/test_kernels_gpu_*.py \
    tests/test_grammar_bitmask.py tests/test_gpu_gemv_engine.py --junitxml "$OUT/pytest_kernels_gpu.xml"
  run kernels-gemv python3 benchmarks/kernels.py --only gemv,elementwise --out "$OUT/kernels_gemv.json"
  for mode in torch triton; do
    AGENTSERVE_GEMV=$mode run "step-profile-gemv-$mode" python3 benchmarks/step_profile.py $DUMMY --batch 1 --steps 200
  done
  for mode in ${KERNELS_LATENCY:+torch triton}; do  # opt-in (KERNELS_LATENCY=1): ~2 more minutes
    AGENTSERVE_GEMV=$mode run "latency-gemv-$mode" python3 benchmarks/latency.py $DUMMY --repeats 2 \
      --out "$OUT/latency_gemv_$mode.json"
  done
fi
if [ "$MODE" = pending ]; then
  # What the end of the 2026-12-02 session left unverified on the GPU, most important first (~9 min on
  # one H200): the re-written fp8 rope+KV store test, the fused LoRA kernel, the speculation paths after
  # the host-time cut (spec/draft_plan.py), engine close returning GPU memory; then the speculation
  # benchmark (batch 256 as a median, with speculative rows counted), the LoRA one-stream A/B and the
  # graph-timed FP8 GEMV tile sweep.
  run pytest-pending python3 -m pytest -m gpu -q -p no:cacheprovider --durations=10 \
    tests/test_kernels_gpu_fp8.py tests/test_kernels_lora.py tests/test_kernels_lora_fused.py tests/test_gpu_spec.py tests/test_engine_close.py \
    --junitxml "$OUT/pytest_pending.xml"
  TMO=300 run spec python3 benchmarks/spec.py --repeats 2 --batches 16 256 --out "$OUT/spec.json"
  TMO=240 run spec-fp8-draft python3 benchmarks/spec.py --draft-quantization fp8 --repeats 2 --batches 16 \
    --out "$OUT/spec_fp8_draft.json"
  for fused in off on; do
    TMO=240 run "lora-fused-$fused" python3 benchmarks/lora.py --lora-fused $fused --counts 1 --cpu-tier-adapters 8 \
      --num-requests 256 --no-record --out "$OUT/lora_fused_$fused.json"
  done
  TMO=180 run fp8-gemv python3 benchmarks/fp8.py --parts gemv --out "$OUT/fp8_gemv.json"
fi
if [ "$MODE" = pdl ]; then
  # Programmatic dependent launch (kernels/_triton_utils.py) and the H200 FP8 GEMV tiles, 2026-12-02
  # (~9 min): the GPU tests the last session left unverified plus the PDL chain test, the graph-timed
  # bf16 + fp8 GEMV tile sweep, one stream / TTFT with PDL off vs on, the LoRA one-stream ratio with
  # the two-kernel vs fused LoRA path, the FP8-draft speculation table.
  TMO=260 run pytest-pdl python3 -m pytest -m gpu -q -p no:cacheprovider --durations=8 tests/test_kernels_pdl.py \
    tests/test_kernels_gpu_fp8.py tests/test_kernels_gpu_gemv.py tests/test_kernels_lora_fused.py tests/test_gpu_spec.py \
    tests/test_engine_close.py tests/test_kernels_lora.py --junitxml "$OUT/pytest_pdl.xml"
  TMO=120 run gemv-sweep python3 benchmarks/fp8.py --parts gemv --out "$OUT/fp8_gemv.json"
  for pdl in 0 1; do
    AGENTSERVE_PDL=$pdl TMO=100 run "latency-pdl-$pdl" python3 benchmarks/latency.py $DUMMY --repeats 2 --out "$OUT/latency_pdl_$pdl.json"
  done
  for fused in off on; do
    TMO=100 run "lora-fused-$fused" python3 benchmarks/lora.py --lora-fused $fused --counts 1 --cpu-tier-adapters 2 \
      --num-requests 64 --no-record --out "$OUT/lora_fused_$fused.json"
  done
  TMO=90 run spec-fp8-draft python3 benchmarks/spec.py --draft-quantization fp8 --repeats 2 --batches 16 \
    --out "$OUT/spec_fp8_draft.json"
fi
if [ "$MODE" = diag ]; then
  # After the pdl run (2026-12-02): the FP8 engine graph-vs-eager test with PDL off and on (its full
  # report kept), where a speculative iteration's time goes, the LoRA one-stream ratio with PDL in the
  # LoRA kernels and the H200 bf16 tiles, and the FP8-vs-bf16 one stream / TTFT / throughput.
  for pdl in 0 1; do
    AGENTSERVE_PDL=$pdl TMO=120 run "fp8-engine-pdl-$pdl" python3 -m pytest -m gpu -q -p no:cacheprovider -x -rA \
      tests/test_kernels_gpu_fp8.py -k "engine_fp8 or rope_kv_write_fp8" -o log_cli=false > "$OUT/fp8_engine_pdl_$pdl.txt" 2>&1
    tail -n 30 "$OUT/fp8_engine_pdl_$pdl.txt"
  done
  TMO=120 run spec-profile python3 benchmarks/spec_profile.py --draft-quantization fp8 --k 4 --acceptance 0.8 \
    --out "$OUT/spec_profile.json"
  TMO=100 run lora-one-stream python3 benchmarks/lora.py --counts 1 --cpu-tier-adapters 2 --num-requests 64 --no-record \
    --out "$OUT/lora_one_stream.json"
  TMO=200 run fp8-weights python3 benchmarks/fp8.py --parts weights --repeats 2 --out "$OUT/fp8_weights.json"
fi
if [ "$MODE" = next ]; then
  # The GPU tests the third session of 2026-12-02 left unrun (~6 min on one H200): device-resident
  # drafts (speculation graphs), the PDL chain (with LoRA), the FP8 engine test's logprobs-close
  # check. (It also ran the GEMV-prefetch and LoRA-GEMV-epilogue tests, removed since with their code.)
  # Then `next-bench`.
  TMO=420 run pytest-next python3 -m pytest -m gpu -q -p no:cacheprovider --durations=8 tests/test_kernels_pdl.py \
    tests/test_gpu_spec.py tests/test_kernels_gpu_fp8.py --junitxml "$OUT/pytest_next.xml"
fi
if [ "$MODE" = next-bench ]; then
  # Its figures (~8 min): the FP8-draft speculation table (device drafts, dynamic k planned for the
  # batch being admitted), the speculation profile, the fast path. (The GEMV weight prefetch and LoRA
  # GEMV epilogue A/Bs it also ran lost: their code is removed, RESULTS.md has the figures.)
  TMO=150 run spec-fp8-draft python3 benchmarks/spec.py --draft-quantization fp8 --repeats 3 --batches 16 256 \
    --out "$OUT/spec_fp8_draft.json"
  TMO=60 run spec-profile python3 benchmarks/spec_profile.py --draft-quantization fp8 --k 4 --out "$OUT/spec_profile.json"
  TMO=120 run fastpath python3 benchmarks/fastpath.py $DUMMY --out "$OUT/fastpath.json"
fi
if [ "$MODE" = spec-ab ]; then
  # After next-bench (2026-12-02, fourth session): the FP8 draft's 2-token catch-up ran W8A8
  # _scaled_mm (GEMV up to M = 1 only): the FP8 GEMV up to M = 2 vs 1, with the throughput runs'
  # warm-up (the first run at a batch size was up to 20% slow in both engines). ~5 min.
  for maxm in 1 2; do
    AGENTSERVE_FP8_GEMV_MAX_M=$maxm TMO=170 run "spec-fp8-gemv-m$maxm" python3 benchmarks/spec.py --draft-quantization fp8 \
      --repeats 3 --batches 16 256 --out "$OUT/spec_fp8_gemv_m$maxm.json"
  done
fi
if [ "$MODE" = lora-side ]; then
  # The base throughput at max_num_seqs 128 (512 adapters over 1,024 requests with max_loras 64 run at
  # most ~128 rows: their ceiling). (It also ran the LoRA side-stream shrink's test and A/B: no gain,
  # code removed.)
  for seqs in 128; do  # max_num_seqs 256: the fastpath run's 13,128 tok/s, same session
    TMO=80 run "throughput-seqs-$seqs" python3 benchmarks/throughput.py $DUMMY --max-num-seqs $seqs \
      --out "$OUT/throughput_seqs_$seqs.json"
  done
fi
if [ "$MODE" = next5 ]; then
  # What the fourth session of 2026-12-02 left unrun, part 1 (~9 min on one H200): the GPU tests of
  # the FP8 path (they held the FP8 producers' quantization test, removed with that flag), the PDL
  # chain and the elementwise kernels, the SDPA first-chunk prefill, the LoRA graphs
  # (the one-token tile-map kernel); the TTFT A/B of the SDPA prefill; LoRA one stream.
  TMO=330 run pytest-next5 python3 -m pytest -m gpu -q -p no:cacheprovider --durations=8 tests/test_kernels_gpu_fp8.py \
    tests/test_kernels_pdl.py tests/test_kernels_gpu_elementwise.py tests/test_gpu_prefill_sdpa.py \
    "tests/test_lora_gpu.py::test_cuda_graphs_with_lora_match_eager" --junitxml "$OUT/pytest_next5.xml"
  for attn in paged sdpa; do
    AGENTSERVE_PREFILL_ATTENTION=$attn TMO=60 run "latency-prefill-$attn" python3 benchmarks/latency.py $DUMMY \
      --repeats 2 --out "$OUT/latency_prefill_$attn.json"
  done
  TMO=90 run lora-one-stream python3 benchmarks/lora.py --counts 1 --cpu-tier-adapters 2 --num-requests 64 --no-record \
    --out "$OUT/lora_one_stream.json"
  for keys in 128 64; do  # split-KV at batch 1 for short contexts (512: the default, measured above as paged)
    AGENTSERVE_SPLIT_MIN_KEYS=$keys TMO=60 run "latency-split-$keys" python3 benchmarks/latency.py $DUMMY \
      --repeats 2 --out "$OUT/latency_split_$keys.json"
  done
fi
if [ "$MODE" = next5-bench ]; then
  # Part 2: the speculation table with the verification's M = 5 projections on the Triton
  # "dot" GEMV (AGENTSERVE_GEMV=triton) vs cuBLAS (the profile had cuBLAS at 2.7-4.1 TB/s there).
  # (The FP8 producers' fused quantization A/B, AGENTSERVE_FP8_FUSED_QUANT=0/1, ran on 2026-12-02 as
  # next6's throughput pair: no gain, and the flag was removed.)
  for gemv in auto triton; do
    AGENTSERVE_GEMV=$gemv TMO=100 run "spec-gemv-$gemv" python3 benchmarks/spec.py --draft-quantization fp8 --repeats 2 \
      --batches 16 --out "$OUT/spec_gemv_$gemv.json"
  done
fi
if [ "$MODE" = next5-extra ]; then
  # Part 3 (~6 min): the two #16 benchmarks fixed on the CPU but never re-measured on the H200; the
  # 1,024-request throughput at vLLM V1's H100/H200-class offline defaults (max_num_seqs 1024,
  # max_num_batched_tokens 16384) and at 512 / 8192, against the 256 / 8192 of fastpath.py.
  TMO=80 run grammar-step python3 benchmarks/grammar_step.py $DUMMY --out "$OUT/grammar_step.json"
  TMO=80 run step-phases python3 benchmarks/step_phases.py $DUMMY --out "$OUT/step_phases.json"
  for shape in "512 8192" "1024 16384"; do
    set -- $shape
    TMO=80 run "throughput-$1-$2" python3 benchmarks/throughput.py $DUMMY --max-num-seqs $1 --max-num-batched-tokens $2 \
      --out "$OUT/throughput_$1_$2.json"
  done
fi
if [ "$MODE" = next6 ]; then
  # Fifth session, first repair call (~9 min): the SDPA prefill after its -1-slot fix (the KV-pool
  # sizing forward faulted in its gather), the LoRA graphs test that fault poisoned, the per-token
  # quantizer test's tolerance, the attention kernels with SPLIT_MIN_KEYS 64; then the TTFT A/B of
  # the SDPA prefill.
  TMO=200 run pytest-next6 python3 -m pytest -m gpu -q -p no:cacheprovider --durations=5 tests/test_gpu_prefill_sdpa.py \
    "tests/test_lora_gpu.py::test_cuda_graphs_with_lora_match_eager" \
    "tests/test_kernels_gpu_fp8.py::test_quantize_per_token_matches_reference" --junitxml "$OUT/pytest_next6.xml"
  TMO=120 run pytest-attention python3 -m pytest -m gpu -q -p no:cacheprovider --durations=5 \
    tests/test_kernels_gpu_attention.py --junitxml "$OUT/pytest_next6_attention.xml"
  for attn in paged sdpa; do
    AGENTSERVE_PREFILL_ATTENTION=$attn TMO=60 run "latency-prefill-$attn" python3 benchmarks/latency.py $DUMMY \
      --repeats 2 --out "$OUT/latency_prefill_$attn.json"
  done
  # The FP8 throughput A/B of the producers' fused quantization (AGENTSERVE_FP8_FUSED_QUANT=0/1) ran
  # here on 2026-12-02: 17,411 vs 17,298 out tok/s, no gain; the flag was removed (RESULTS.md, NOTES.md).
fi
if [ "$MODE" = next6-bench ]; then
  # Fifth session, second call (~8 min): the speculation table with the verification's M = 5
  # projections on the Triton GEMV vs cuBLAS; the two #16 benchmarks fixed on the CPU; the 1,024-request
  # throughput at max_num_seqs 512 (fastpath: 256).
  for gemv in auto triton; do
    AGENTSERVE_GEMV=$gemv TMO=100 run "spec-gemv-$gemv" python3 benchmarks/spec.py --draft-quantization fp8 --repeats 2 \
      --batches 16 --out "$OUT/spec_gemv_$gemv.json"
  done
  TMO=80 run grammar-step python3 benchmarks/grammar_step.py $DUMMY --out "$OUT/grammar_step.json"
  TMO=80 run step-phases python3 benchmarks/step_phases.py $DUMMY --out "$OUT/step_phases.json"
  TMO=80 run "throughput-512-8192" python3 benchmarks/throughput.py $DUMMY --max-num-seqs 512 --max-num-batched-tokens 8192 \
    --out "$OUT/throughput_512_8192.json"
fi
if [ "$MODE" = next7 ]; then
  # Fifth session, third call (~6 min): grammar rows kept in async scheduling (the previous step is
  # processed inside the next one's launch): its GPU test and async vs sync on the device, the
  # grammar_step overhead; then the #16 table with this session's defaults (SDPA first-chunk
  # prefill, SPLIT_MIN_KEYS 64; max_num_seqs 512, with 256 after it as the A/B; no peer: its ratio is in
  # the earlier runs) and LoRA one stream.
  TMO=150 run pytest-next7 python3 -m pytest -m gpu -q -p no:cacheprovider --durations=5 tests/test_async_scheduling.py \
    -k "grammar or (matches_sync and llama3)" --junitxml "$OUT/pytest_next7.xml"
  TMO=80 run grammar-step python3 benchmarks/grammar_step.py $DUMMY --out "$OUT/grammar_step.json"
  TMO=200 run fastpath python3 benchmarks/fastpath.py $DUMMY --max-num-seqs 512 --out "$OUT/fastpath.json"
  TMO=80 run throughput-256 python3 benchmarks/throughput.py $DUMMY --max-num-seqs 256 --out "$OUT/throughput_256.json"
  TMO=90 run lora-one-stream python3 benchmarks/lora.py --counts 1 --cpu-tier-adapters 2 --num-requests 64 --no-record \
    --out "$OUT/lora_one_stream.json"
fi
if [ "$MODE" = next8 ]; then
  # Fifth session, last call (~3 min): where the host's time goes in a batch-64 step with grammar
  # masks after the overlap (grammar_step: +23% at batch 64, target < 5%).
  TMO=120 run grammar-host python3 benchmarks/grammar_host.py $DUMMY --batch 64 --out "$OUT/grammar_host.json"
fi
if [ "$MODE" = next9 ]; then
  # Why 64 matcher fills take 3.6 ms on a 16-core host (2 cores here: 3.3 ms): the CPUs the process
  # may use, and the fills with torch's OpenMP threads kept from spinning beside llguidance's pool.
  nproc; python3 -c "import os; print('affinity', len(os.sched_getaffinity(0)))"; cat /sys/fs/cgroup/cpu.max 2>/dev/null
  OMP_NUM_THREADS=1 TMO=100 run grammar-host-omp1 python3 benchmarks/grammar_host.py $DUMMY --batch 64 \
    --out "$OUT/grammar_host_omp1.json"
fi
if [ "$MODE" = quick ] || [ "$MODE" = full ]; then
  # Only the modules that hold GPU tests: the others import CPU-test tools the GPU machine lacks.
  run pytest-gpu python3 -m pytest -m gpu -q -p no:cacheprovider --durations=15 $(grep -l "mark.gpu" tests/test_*.py) --junitxml "$OUT/pytest_gpu.xml"
  run kernels python3 benchmarks/kernels.py ${KERNEL_BENCH_ARGS:-} --out "$OUT/kernels.json"
  run latency python3 benchmarks/latency.py $DUMMY --out "$OUT/latency.json"
fi
if [ "$MODE" = full ] || [ "$MODE" = fastpath ]; then
  # The issue-3 figures with their limits in one table (one stream, TTFT 8k, throughput, peer ratio).
  run fastpath python3 benchmarks/fastpath.py $DUMMY --peer hf --peer-requests 256 --out "$OUT/fastpath.json"
fi
if [ "$MODE" = full ] || [ "$MODE" = bench ]; then
  run throughput python3 benchmarks/throughput.py $DUMMY --num-requests 1024 --peer hf --peer-requests 256 --out "$OUT/throughput.json"
  run throughput-torch-ref python3 benchmarks/throughput.py $DUMMY --attention-backend torch --num-requests 256 --max-num-seqs 64 --out "$OUT/throughput_torch_ref.json"
  [ -f benchmarks/agent_loop.py ] && run agent-loop python3 benchmarks/agent_loop.py $DUMMY --agents 64 --turns 8 --out "$OUT/agent_loop.json"
  run grammar-step python3 benchmarks/grammar_step.py $DUMMY --out "$OUT/grammar_step.json"
fi
ls -la "$OUT"
