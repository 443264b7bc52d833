#!/usr/bin/env bash
# Everything the GPU issues measure, in one command on the benchmark machine:
#   bash benchmarks/gpu_suite.sh [quick|full|bench|kernels|fastpath|bench16|sessions21|s23a|s24d|gputests]
#   (gputests: GPU_TEST_FILES=kernels or a list of test files runs a part)
# (one-off modes that have run are dropped; RESULTS.md keeps each run's command, git the script)
# kernels: the GPU kernel tests (with per-test durations), the gemv + elementwise kernel sections, and
# the batch-1 decode step with AGENTSERVE_GEMV=torch vs triton (GPU time per step): one device call,
# about 5-7 minutes on a fresh H100 (most of it Triton compiles and the two 8B dummy model builds);
# KERNELS_LATENCY=1 adds benchmarks/latency.py for both GEMV modes.
# Before the call, here: `../shared/gpu/wheels.sh jsonschema attrs referencing rpds-py jsonschema-specifications`
# (the default list lacks jsonschema, which test_gpu_spec.py imports: without it that file does not collect)
# and `../shared/gpu/wheels.sh grpcio-health-checking==1.84.0 grpcio-reflection==1.84.0` (the gRPC server imports
# them: without them test_gpu_logprobs_streams.py, which imports conftest_grpc, does not collect).
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
if [ "$MODE" = sessions21 ]; then
  # Twenty-first session (~8-9 min): the GPU tests of the page kernels, the swap streams and the engine's swaps;
  # the sessions mode alone with the old 1 GiB staging bound (the A/B of the bound sized from free memory);
  # then the agent loop's ratio (sessions and stateless + prefix caching in one process) at the defaults:
  # the bound from free memory, swaps in 256 MiB pieces of one gather or scatter each.
  TMO=180 run pytest-gpu-sessions python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_gpu_page_copy.py \
    tests/test_gpu_swap_streams.py tests/test_gpu_engine.py --junitxml "$OUT/pytest_gpu_sessions.xml"
  AGENTSERVE_SWAP_STAGING_GB=1 TMO=150 run agent-loop-staging-1gib python3 benchmarks/agent_loop.py $DUMMY \
    --agents 64 --turns 8 --modes sessions --out "$OUT/agent_loop_staging_1gib.json"
  TMO=330 run agent-loop python3 benchmarks/agent_loop.py $DUMMY --agents 64 --turns 8 \
    --modes sessions,stateless-prefix --out "$OUT/agent_loop.json"
  # The long-context decode attention (half the sessions' decode-only step) per split count.
  TMO=150 TAIL=12 run attention-mixed python3 benchmarks/attention_mixed.py --out "$OUT/attention_mixed.json"
fi
if [ "$MODE" = s23a ]; then
  # Twenty-third session (< 10 min): why the sessions' decode-only steps run 2.7 ms longer than the stateless
  # mode's at the same KV reads (the timeline splits them by device ops; host time per part of the swaps;
  # allocator counters), with the outputs handed to the event loop once per step; the sessions mode again with
  # the interpreter's 5 ms switch interval against the engine's 0.5 ms default (the GIL question; both modes); then the FP8 and bf16 GEMV kernels' GPU tests after
  # the halves loop's removal (SKIP_GEMV=1 leaves them out: they passed on an H100 in this session's first call).
  # Needs grpcio-health-checking and grpcio-reflection among the wheels (../shared/gpu/wheels.sh
  # grpcio-health-checking==1.84.0 grpcio-reflection==1.84.0): the server imports them.
  AGENTSERVE_SWITCH_INTERVAL_MS=0 TMO=250 TAIL=30 run agent-loop-switch5 python3 benchmarks/agent_loop.py $DUMMY \
    --agents 64 --turns 8 --modes sessions,stateless-prefix --out "$OUT/agent_loop_switch5.json"
  TMO=250 TAIL=30 run agent-loop python3 benchmarks/agent_loop.py $DUMMY --agents 64 --turns 8 \
    --modes sessions,stateless-prefix --out "$OUT/agent_loop.json"
  [ -n "${SKIP_GEMV:-}" ] || TMO=90 run pytest-gpu-gemv python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_gpu_fp8.py \
    tests/test_kernels_gpu_gemv.py tests/test_kernels_gpu_gemv_silu.py --junitxml "$OUT/pytest_gpu_gemv.xml"
  ls -la "$OUT"; exit 0
fi
if [ "$MODE" = s24d ]; then
  # Twenty-fourth session (< 4 min): the paced swap-in chunks gated on an event after each step's uploads (s24c:
  # pacing by host order alone left the decode steps with ops at 21 ms: the uploads wait on the step's stream
  # for the previous forward while the copy stream is free). The GPU swap tests (the sessions one hung in s24c
  # before the idle engine released queued copies; it failed in this mode's first run, on an H100, before the
  # inference-mode fix), then both modes (s24c's unpaced sessions p95: 5,723 ms; this mode's first run: 5,234 ms
  # and 819 forced chunks, before the next-fit swap slots). Next: run it on the H200 for #16's ratio.
  TMO=90 run pytest-gpu-swaps python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_swap_streams.py \
    tests/test_kernels_gpu_page_copy.py --junitxml "$OUT/pytest_gpu_swaps.xml"
  TMO=200 TAIL=30 run agent-loop python3 benchmarks/agent_loop.py $DUMMY --agents 64 --turns 8 \
    --modes sessions,stateless-prefix --out "$OUT/agent_loop.json"
  ls -la "$OUT"; exit 0
fi
if [ "$MODE" = gputests ]; then
  # Every GPU test in one call (< 10 min), the engine-level files first (what the sessions since the last full
  # run changed: the scheduler's LoRA fairness, speculation's grammar failures, swap pacing, EOS stop reasons),
  # then the kernels; -v into a log under $OUT, so a run the limit stops still shows each finished test.
  ENGINE_FILES="tests/test_gpu_engine.py tests/test_async_scheduling.py tests/test_engine_close.py tests/test_gpu_spec.py
    tests/test_lora_gpu.py tests/test_lora_spec.py tests/test_gpu_request_features.py tests/test_gpu_batch_defaults.py
    tests/test_gpu_arch_variants.py tests/test_gpu_swap_streams.py tests/test_gpu_split_long.py tests/test_gpu_prefill_sdpa.py
    tests/test_gpu_gemv_engine.py tests/test_gpu_logprobs_streams.py tests/test_gpu_tp.py"
  KERNEL_FILES=$(grep -l "mark.gpu" tests/test_*.py | grep -v -F -f <(echo "$ENGINE_FILES" | tr ' ' '\n' | grep .))
  # The whole set takes ~14 minutes on an H100 (s27: 312 tests in four calls), more than one call's 10: GPU_TEST_FILES
  # names a part (GPU_TEST_FILES=kernels: the kernel files). A test that stands 200 s dumps every thread's stack.
  case "${GPU_TEST_FILES:-}" in
    "") FILES="$ENGINE_FILES $KERNEL_FILES" ;;
    kernels) FILES=$KERNEL_FILES ;;
    *) FILES=$GPU_TEST_FILES ;;
  esac
  timeout "${TMO:-570}" python3 -X faulthandler -m pytest -m gpu -v -p no:cacheprovider --continue-on-collection-errors \
    --durations=20 -o faulthandler_timeout=200 $FILES --junitxml "$OUT/pytest_gpu.xml" > "$OUT/pytest_gpu.log" 2>&1
  echo "pytest rc $?"; grep -E "PASSED|FAILED|ERROR|SKIPPED" "$OUT/pytest_gpu.log" | awk '{print $2}' | sort | uniq -c
  grep -E "FAILED|ERROR" "$OUT/pytest_gpu.log" | head -20; tail -n 30 "$OUT/pytest_gpu.log"
  exit 0
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
