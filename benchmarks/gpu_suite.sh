#!/usr/bin/env bash
# Everything the GPU issues measure, in one command on the benchmark machine:
#   bash benchmarks/gpu_suite.sh [quick|full|bench|kernels|fastpath|chain|wfirst|rest|splitlong|s12a|s12b|s13|s13b|bench16]
# (one-off modes that have run are dropped; RESULTS.md keeps each run's command, git the script)
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
run() { local name=$1; shift; echo "=== $name: $*"; local t0=$SECONDS; timeout "${TMO:-900}" "$@" 2>&1 | grep -v "it/s\]" | tail -n "${TAIL:-40}"; echo "--- $name took $((SECONDS - t0)) s"; }
DUMMY="--model llama-3.1-8b --load-format dummy --dtype bfloat16"
if [ "$MODE" = wfirst ]; then
  # Seventeenth session (~2 min + start): the FP8 GEMVs' first weight chunk before the PDL wait, off and on: the
  # FP8 chain (PDL on) and the FP8 8B one stream (prediction in NOTES.md).
  for v in 0 1; do
    AGENTSERVE_FP8_WEIGHTS_BEFORE_WAIT=$v TMO=60 TAIL=3 run "chain-fp8-wfirst$v" python3 benchmarks/gemv_chain.py \
      --weights fp8 --pdl on --out "$OUT/chain_fp8_wfirst$v.json"
  done
  for v in 0 1; do
    AGENTSERVE_FP8_WEIGHTS_BEFORE_WAIT=$v TMO=70 TAIL=4 run "latency-fp8-wfirst$v" python3 benchmarks/latency.py $DUMMY \
      --quantization fp8 --repeats 2 --out "$OUT/latency_fp8_wfirst$v.json"
  done
  # the FP8 draft's steps too (speculation, A = 0.8, k = 4 among the table's rows) where the one stream gained
  gained=$(python3 -c "import json, sys; a, b = (json.load(open(p))['single_stream']['decode_tok_s'] for p in sys.argv[1:]); print(int(b > a * 1.01))" \
    "$OUT/latency_fp8_wfirst0.json" "$OUT/latency_fp8_wfirst1.json")
  [ "$gained" = 1 ] && AGENTSERVE_FP8_WEIGHTS_BEFORE_WAIT=1 TMO=200 run spec-wfirst python3 benchmarks/spec.py \
    --draft-quantization fp8 --repeats 3 --batches 16 256 --out "$OUT/spec_wfirst.json"
  ls -la "$OUT"; exit 0
fi
if [ "$MODE" = chain ]; then
  # Seventeenth session (~1.5 min + start): a layer's four GEMVs as one dependent chain in a graph against the
  # kernels alone, bf16 and FP8, PDL on and off (benchmarks/gemv_chain.py; prediction in NOTES.md).
  TMO=200 TAIL=8 run gemv-chain python3 benchmarks/gemv_chain.py --out "$OUT/gemv_chain.json"
  ls -la "$OUT"; exit 0
fi
if [ "$MODE" = kernels ]; then
  run pytest-kernels-gpu python3 -m pytest -m gpu -q -p no:cacheprovider --durations=15 tests/test_kernels_gpu_*.py \
    tests/test_grammar_bitmask.py tests/test_gpu_gemv_engine.py --junitxml "$OUT/pytest_kernels_gpu.xml"
  run kernels-gemv python3 benchmarks/kernel_suite.py --only gemv,elementwise --out "$OUT/kernels_gemv.json"
  for mode in torch triton; do
    AGENTSERVE_GEMV=$mode run "step-profile-gemv-$mode" python3 benchmarks/step_profile.py $DUMMY --batch 1 --steps 200
  done
  for mode in ${KERNELS_LATENCY:+torch triton}; do  # opt-in (KERNELS_LATENCY=1): ~2 more minutes
    AGENTSERVE_GEMV=$mode run "latency-gemv-$mode" python3 benchmarks/latency.py $DUMMY --repeats 2 \
      --out "$OUT/latency_gemv_$mode.json"
  done
fi
if [ "$MODE" = rest ]; then
  # The eleventh session's last device minutes (~5 min): the GPU tests `next` could not reach in its limit,
  # most telling first (the multi-token split's kernel test, split-long in the engine, bf16 against
  # transformers on two archs, the kernel-variant warmup), with the multi-token split on.
  AGENTSERVE_SPLIT_MAX_QUERY_LEN=8 TMO=250 run pytest-rest python3 -m pytest -m gpu -v -rf -p no:cacheprovider \
    "tests/test_kernels_gpu_attention.py::test_split_kv_verification_rows" tests/test_gpu_split_long.py \
    "tests/test_gpu_engine.py::test_bf16_matches_transformers[llama3]" "tests/test_gpu_engine.py::test_bf16_matches_transformers[qwen3]" \
    tests/test_gpu_engine.py::test_unified_kernel_warmup_covers_the_variants_a_step_selects \
    "tests/test_gpu_engine.py::test_triton_path_with_tiny_chunks_and_prefix_cache[qwen3]" --junitxml "$OUT/pytest_rest.xml"
fi
if [ "$MODE" = splitlong ]; then
  # The split-long engine test after its stale precondition was fixed (split-long is on by default now).
  TMO=150 run pytest-splitlong python3 -m pytest -m gpu -v -rf -p no:cacheprovider tests/test_gpu_split_long.py \
    --junitxml "$OUT/pytest_splitlong.xml"
fi
if [ "$MODE" = s12a ]; then
  # The twelfth session's GPU tests (~8 min): the new per-request-features module first (prompt logprobs,
  # allowed ids, bad words, logit bias through graphs, async and speculation), then the engine-level tests
  # that have not run on the current kernels, most telling first; -v -rf so that a cut run names its failures.
  E=tests/test_gpu_engine.py; A=tests/test_async_scheduling.py; L=tests/test_lora_gpu.py
  TMO=520 run pytest-s12a python3 -m pytest -m gpu -v -rf -p no:cacheprovider --durations=10 \
    tests/test_gpu_request_features.py "$E::test_swap_round_trip_is_exact_and_asynchronous" \
    "$E::test_triton_path_matches_torch_reference_bf16[qwen2]" "$E::test_bf16_matches_transformers[llama]" \
    "$E::test_bf16_matches_transformers[mistral]" "$E::test_bf16_matches_transformers[qwen2]" \
    tests/test_lora_spec.py "$L::test_cuda_graphs_with_lora_match_eager[llama3]" "$L::test_base_only_decode_replays_the_base_graph" \
    "$L::test_slot_reload_waits_for_the_step_reading_it" "$A::test_cuda_grammar_batches_overlap_and_match_sync[qwen2]" \
    "$A::test_cuda_async_scheduling_matches_sync[bfloat16-llama3]" tests/test_engine_close.py \
    "$E::test_triton_path_with_tiny_chunks_and_prefix_cache[llama]" "$E::test_triton_path_with_tiny_chunks_and_prefix_cache[mistral]" \
    --junitxml "$OUT/pytest_s12a.xml"
fi
if [ "$MODE" = s12b ]; then
  # The twelfth session's last call (~8 min): the GPU tests s12a could not reach, engine-level first
  # (tiny chunks, fp32 against transformers, LoRA against PEFT merged in fp32 and bf16, async fp32), then
  # the kernel modules; -v -rf so that a cut run names what ran.
  E=tests/test_gpu_engine.py; A=tests/test_async_scheduling.py
  TMO=500 TAIL=250 run pytest-s12b python3 -m pytest -m gpu -v -rf -p no:cacheprovider \
    "$E::test_triton_path_with_tiny_chunks_and_prefix_cache" "$E::test_fp32_matches_transformers_on_gpu" \
    tests/test_lora_gpu.py "$A::test_cuda_async_scheduling_matches_sync[float32-llama]" \
    "$A::test_cuda_async_scheduling_matches_sync[float32-qwen3]" tests/test_gpu_swap_streams.py \
    tests/test_gpu_prefill_sdpa.py tests/test_grammar_bitmask.py tests/test_kernels_pdl.py \
    tests/test_kernels_gpu_gemv.py tests/test_kernels_gpu_gemv_silu.py tests/test_kernels_gpu_argmax.py \
    tests/test_kernels_gpu_elementwise.py tests/test_kernels_gpu_fp8.py tests/test_kernels_lora.py \
    tests/test_kernels_lora_fused.py --junitxml "$OUT/pytest_s12b.xml"
fi
if [ "$MODE" = s13 ]; then
  # The thirteenth session's GPU tests (~8 min): the new config variants (biases on every projection, YaRN)
  # on the fast path against transformers, then the kernel modules and async fp32 that last ran on the
  # tenth session's kernels; -v -rf so that a cut run names what ran.
  A=tests/test_async_scheduling.py
  TMO=520 TAIL=250 run pytest-s13 python3 -m pytest -m gpu -v -rf -p no:cacheprovider tests/test_gpu_arch_variants.py \
    "$A::test_cuda_async_scheduling_matches_sync[float32-llama]" "$A::test_cuda_async_scheduling_matches_sync[float32-qwen3]" \
    tests/test_gpu_swap_streams.py tests/test_gpu_prefill_sdpa.py tests/test_grammar_bitmask.py tests/test_kernels_pdl.py \
    tests/test_kernels_gpu_gemv.py tests/test_kernels_gpu_gemv_silu.py tests/test_kernels_gpu_argmax.py \
    tests/test_kernels_gpu_elementwise.py tests/test_kernels_gpu_fp8.py tests/test_kernels_lora.py \
    tests/test_kernels_lora_fused.py --junitxml "$OUT/pytest_s13.xml"
fi
if [ "$MODE" = s13b ]; then
  # The thirteenth session's last call (~8 min): the GPU paths the type-gate edits touched (decode graphs,
  # speculation's draft and verification graphs, LoRA graphs, FP8, the Triton path against transformers),
  # then fastpath without the peer and the agent loop: TTFT on the fresh engine and after the throughput
  # run, now on different prompts (the question s13's bench16 could not answer).
  E=tests/test_gpu_engine.py; L=tests/test_lora_gpu.py
  TMO=330 TAIL=60 run pytest-s13b python3 -m pytest -m gpu -v -rf -p no:cacheprovider -x \
    "$E::test_fp32_matches_transformers_on_gpu[llama3]" "$E::test_fp32_matches_transformers_on_gpu[qwen3]" \
    "$E::test_triton_path_with_tiny_chunks_and_prefix_cache[qwen2]" tests/test_gpu_spec.py \
    "$L::test_cuda_graphs_with_lora_match_eager[llama3]" "tests/test_gpu_arch_variants.py::test_variant_matches_transformers_on_gpu[llama-biases-bfloat16]" \
    --junitxml "$OUT/pytest_s13b.xml"
  TMO=230 run fastpath-ttft python3 benchmarks/fastpath.py $DUMMY --out "$OUT/fastpath_ttft.json"
fi
if [ "$MODE" = quick ] || [ "$MODE" = full ]; then
  # Only the modules that hold GPU tests: the others import CPU-test tools the GPU machine lacks.
  run pytest-gpu python3 -m pytest -m gpu -q -p no:cacheprovider --durations=15 $(grep -l "mark.gpu" tests/test_*.py) --junitxml "$OUT/pytest_gpu.xml"
  run kernels python3 benchmarks/kernel_suite.py ${KERNEL_BENCH_ARGS:-} --out "$OUT/kernels.json"
  run latency python3 benchmarks/latency.py $DUMMY --out "$OUT/latency.json"
fi
if [ "$MODE" = bench16 ]; then
  # Issue #16's figures in one `agentserve bench` run (~8-9 min): one stream, TTFT 8k, throughput with
  # the transformers peer, then the agent loop's three modes on a fresh engine.
  # The GPU's clocks, temperature, power and throttle reasons once a second beside it (why TTFT after the
  # throughput run sits above latency.py's on a fresh engine: the thirteenth session's question).
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active \
    --format=csv -lms 1000 > "$OUT/gpu_clocks.csv" 2>&1 & CLOCKS=$!
  TMO=590 run bench16 python3 -m agentserve.cli bench $DUMMY --peer hf --peer-requests 256 --agent-loop \
    --out "$OUT/bench16.json"
  kill $CLOCKS
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
