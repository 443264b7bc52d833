#!/usr/bin/env bash
# Everything the GPU issues measure, in one command on the benchmark machine:
#   bash benchmarks/gpu_suite.sh [quick|full|bench|kernels|fastpath|next|spec8|bench16]
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
if [ "$MODE" = next ]; then
  # Left by the seventh session (2026-12-03; ~9 min): the two-op swap in (start the copy, admit the
  # turn when it has arrived) on the GPU, then its agent-loop A/B (predicted: the step's stream
  # device-op time 9.7 s -> ~1-2 s, sessions p95 ~8.2 s -> ~6-6.5 s) with stateless + prefix
  # caching for the p95 ratio, then the 512-adapter LoRA run after the split-K tweak.
  TMO=100 run pytest-swap-gpu python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_swap_streams.py \
    --junitxml "$OUT/pytest_swap_streams_gpu.xml"
  for streams in 1 0; do
    AGENTSERVE_SWAP_STREAMS=$streams TMO=110 run "agent-loop-sessions-streams$streams" python3 benchmarks/agent_loop.py \
      $DUMMY --agents 64 --turns 8 --modes sessions --swap-space-gb 64 --out "$OUT/agent_loop_sessions_streams$streams.json"
  done
  TMO=150 run agent-loop-prefix python3 benchmarks/agent_loop.py $DUMMY --agents 64 --turns 8 --modes stateless-prefix \
    --swap-space-gb 64 --out "$OUT/agent_loop_prefix.json"
  TMO=180 run lora-512 python3 benchmarks/lora.py --counts 64 --cpu-tier-adapters 512 --repeats 1 --no-record \
    --out "$OUT/lora_512.json"
fi
if [ "$MODE" = spec8 ]; then
  # Eighth session (2026-12-03; ~4 min): proposals queued on the device behind each verification
  # (spec/continuation.py) through the graphs, then spec.py with its continuation-off A/B row
  # (predicted: A=0.8 k=4 1.65x -> ~1.80-1.95x; NOTES.md "Eighth session").
  TMO=240 run pytest-spec-gpu python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_spec.py \
    --junitxml "$OUT/pytest_spec_gpu.xml"
  TMO=300 run spec python3 benchmarks/spec.py --draft-quantization fp8 --repeats 2 --batches 16 256 --out "$OUT/spec_s8.json"
  TMO=150 run prefill-profile python3 benchmarks/prefill_profile.py --out "$OUT/prefill_profile_s8.json"
  # The seventh session's two-op swap in with the copy streams on: its run in `next` hit the 110 s
  # timeout (a cold 75 s model load); the same run with room.
  TMO=240 run agent-loop-sessions-streams1 python3 benchmarks/agent_loop.py $DUMMY --agents 64 --turns 8 \
    --modes sessions --swap-space-gb 64 --out "$OUT/agent_loop_sessions_streams1.json"
fi
if [ "$MODE" = specprof ]; then
  # Eighth session: the continuation moved A=0.8 k=4 only 396.9 -> 400.0 tok/s; is the iteration
  # device-bound? Device busy / idle per verification and its kernels, continuation on and off.
  for cont in on off; do
    TMO=200 run "spec-profile-$cont" python3 benchmarks/spec_profile.py --draft-quantization fp8 --k 4 --acceptance 0.8 \
      $([ $cont = off ] && echo --no-continuation) --out "$OUT/spec_profile_$cont.json"
  done
fi
if [ "$MODE" = last8 ]; then
  # Eighth session's last ~3 device minutes: the new kernels' GPU tests (split argmax, pages-to-heads
  # gather), then TTFT's profile and the spec table with FP8 GEMV M <= 2 + the split argmax
  # (predicted: TTFT 211.8 -> ~206 ms; A=0.8 k=4 1.66x -> ~1.80x; NOTES.md "Eighth session").
  TMO=90 run pytest-new-kernels python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_gpu_argmax.py \
    tests/test_gpu_prefill_sdpa.py --junitxml "$OUT/pytest_last8.xml"
  TMO=60 run prefill-profile python3 benchmarks/prefill_profile.py --out "$OUT/prefill_profile_last8.json"
  TMO=120 run spec python3 benchmarks/spec.py --draft-quantization fp8 --repeats 2 --batches 16 --out "$OUT/spec_last8.json"
fi
if [ "$MODE" = quick ] || [ "$MODE" = full ]; then
  # Only the modules that hold GPU tests: the others import CPU-test tools the GPU machine lacks.
  run pytest-gpu python3 -m pytest -m gpu -q -p no:cacheprovider --durations=15 $(grep -l "mark.gpu" tests/test_*.py) --junitxml "$OUT/pytest_gpu.xml"
  run kernels python3 benchmarks/kernels.py ${KERNEL_BENCH_ARGS:-} --out "$OUT/kernels.json"
  run latency python3 benchmarks/latency.py $DUMMY --out "$OUT/latency.json"
fi
if [ "$MODE" = bench16 ]; then
  # Issue #16's figures in one `agentserve bench` run (~8-9 min): one stream, TTFT 8k, throughput with
  # the transformers peer, then the agent loop's three modes on a fresh engine.
  TMO=590 run bench16 python3 -m agentserve.cli bench $DUMMY --peer hf --peer-requests 256 --agent-loop \
    --out "$OUT/bench16.json"
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
