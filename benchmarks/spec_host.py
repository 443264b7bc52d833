"""Host time of a speculative decode step, by phase, on the CPU with a tiny model.

On the GPU the host's work between the proposal's sync and the verification launch, and between the
verification's sync and the next proposal, sits on the critical path (the device idles meanwhile:
a speculative step runs in the synchronous order). On the CPU with a tiny model the forwards are
small, so the rest of Engine.step is what this measures. The target is its own draft and
`spec_synthetic_acceptance` fixes the acceptance (default 0.8), k fixed (default 4). By default the
step takes the GPU's code paths (padded verification and catch-up inputs, draft decode replays) with
eager stand-ins for the CUDA graphs, so the host builds what it builds on the GPU; pinned host
buffers exist on CUDA only, so their cost does not show here.

Phases, ms per Engine.step (median over the measured steps; `mean step` is the mean):
  propose        Speculation.__call__ minus the draft's forwards (catch-up and k - 1 decode steps:
                 input building, sampling the drafts, the matcher copies, the one host copy)
  draft fwd      the draft model's forwards and logits (model compute: on the GPU, device time)
  schedule       Scheduler.schedule
  verify inputs  ModelRunner.prepare + the sampling metadata of the verification step
  target fwd     the target's forward and logits (model compute)
  reject         RejectionSampler.__call__ (its ops are device work on the GPU; their launch is host)
  verify rest    the rest of ModelRunner.launch (spec metadata, masks, draft probs, output packing)
  update         OutputProcessor.update_from_output (sync, appending tokens, stops, detokenizing)
  collect        OutputProcessor.collect_outputs
  other          the rest of Engine.step (launch_step's bookkeeping, metrics, lookahead slots)
  host           step minus the two forwards: the host's time on the critical path

  python benchmarks/spec_host.py                  # batch 1 and 8, k = 4, A = 0.8
  python benchmarks/spec_host.py --record         # and a line in RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_result, command_line, device_name, write_json  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.engine.engine import Engine  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.model.attention import ForwardMetadata  # noqa: E402
from agentserve.spec.draft import MAX_DECODE_CATCH_UP  # noqa: E402
from agentserve.spec.draft_inputs import PaddedInputs  # noqa: E402
from agentserve.worker import model_runner  # noqa: E402

PHASES = ("propose", "draft fwd", "schedule", "verify inputs", "target fwd", "reject", "verify rest",
          "update", "collect", "other", "host", "step")


class StepTimer:
    """Inclusive wall time of wrapped callables, per step."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self._open: set[str] = set()  # names being timed: a nested call of the same name is inside it

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if name in self._open:
                return fn(*args, **kwargs)
            self._open.add(name)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] += time.perf_counter() - t
                self._open.discard(name)
        return timed

    def end_step(self, record: bool) -> None:
        if record:
            self.steps.append(dict(self.current))
        self.current.clear()


class EagerPaddedGraphs:
    """Stands in for VerifyGraphs on the CPU: the same padded inputs, run eagerly, so the host builds
    exactly what it builds for the GPU's verification and catch-up replays."""

    def __init__(self, model: Any, kv_layers: list[tuple[torch.Tensor, torch.Tensor]], max_query_len: int) -> None:
        self.model, self.kv_layers, self.max_query_len = model, kv_layers, max_query_len

    def padded_size(self, bs: int, q: int) -> Optional[int]:
        return bs if 2 <= q <= self.max_query_len else None

    def run(self, inputs: PaddedInputs, q: int) -> torch.Tensor:
        bs = inputs.seq_lens.shape[0]
        meta = ForwardMetadata(slot_mapping=inputs.slot_mapping, block_tables=inputs.block_tables,
                               query_start_loc=torch.arange(bs + 1, dtype=torch.int32) * q, seq_lens=inputs.seq_lens,
                               max_query_len=q, max_seq_len=int(inputs.seq_lens.max()))
        return self.model(inputs.input_ids, inputs.positions, self.kv_layers, meta)


class EagerDecodeGraphs:
    """Stands in for the draft's DecodeGraphs on the CPU (inputs already built; returns logits)."""

    def __init__(self, model: Any, kv_layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.model, self.kv_layers = model, kv_layers

    def padded_size(self, bs: int) -> Optional[int]:
        return bs

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int) -> torch.Tensor:
        bs = input_ids.shape[0]
        meta = ForwardMetadata(slot_mapping=slot_mapping, block_tables=block_tables,
                               query_start_loc=torch.arange(bs + 1, dtype=torch.int32), seq_lens=seq_lens.to(torch.int32),
                               max_query_len=1, max_seq_len=max_seq_len)
        return self.model.compute_logits(self.model(input_ids, positions, self.kv_layers, meta))


def use_graph_paths(engine: Engine, k: int) -> None:
    """The GPU's code paths (verification and catch-up over padded inputs, draft decode replays),
    with eager stand-ins for the graphs."""
    runner, draft = engine.runner, engine.runner.draft
    assert draft is not None and draft.cache is not None
    runner.verify_graphs = EagerPaddedGraphs(runner.model, runner.kv_cache.layers, 1 + k)  # type: ignore[assignment]
    draft.graphs = EagerDecodeGraphs(draft.model, draft.cache.layers)
    draft.catch_up_graphs = EagerPaddedGraphs(draft.model, draft.cache.layers, MAX_DECODE_CATCH_UP)


def instrument(engine: Engine, timer: StepTimer) -> Callable[[], None]:
    """Wraps the phases' callables on this engine's objects (and one module attribute, undone after)."""
    runner = engine.runner
    draft = runner.draft
    assert draft is not None
    proposer = engine.spec_proposer
    assert proposer is not None

    class TimedProposer:
        def num_tokens_for_step(self, batch_size: int) -> int:
            return proposer.num_tokens_for_step(batch_size)

        __call__ = staticmethod(timer.wrap("propose", proposer.__call__))
        # The proposal queued behind each verification (spec/continuation.py): its launches.
        after_launch = staticmethod(timer.wrap("propose", proposer.after_launch))
        release = staticmethod(proposer.release)

    engine.spec_proposer = TimedProposer()
    for model, name in ((draft.model, "draft fwd"), (runner.model, "target fwd")):
        model.forward = timer.wrap(name, model.forward)  # type: ignore[method-assign]
        model.compute_logits = timer.wrap(name, model.compute_logits)  # type: ignore[method-assign]
    # The stand-ins' whole run is the forward (on the GPU, a replay), as is the draft's eager path.
    for graphs, name in ((runner.verify_graphs, "target fwd"), (draft.graphs, "draft fwd"),
                         (draft.catch_up_graphs, "draft fwd")):
        if graphs is not None:
            graphs.run = timer.wrap(name, graphs.run)  # type: ignore[method-assign]
    engine.scheduler.schedule = timer.wrap("schedule", engine.scheduler.schedule)  # type: ignore[method-assign]
    runner.prepare = timer.wrap("verify inputs", runner.prepare)  # type: ignore[method-assign]
    runner._sampling_metadata = timer.wrap("verify inputs", runner._sampling_metadata)  # type: ignore[method-assign]
    runner.launch = timer.wrap("launch", runner.launch)  # type: ignore[method-assign]
    runner.rejection_sampler = timer.wrap("reject", runner.rejection_sampler)  # type: ignore[assignment]
    engine.output.update_from_output = timer.wrap("update", engine.output.update_from_output)  # type: ignore[method-assign]
    engine.output.collect_outputs = timer.wrap("collect", engine.output.collect_outputs)  # type: ignore[method-assign]
    padded = model_runner.padded_verification_inputs
    model_runner.padded_verification_inputs = timer.wrap("verify inputs", padded)

    def undo() -> None:
        model_runner.padded_verification_inputs = padded
    return undo


def phases_of(raw: dict[str, float], step_s: float) -> dict[str, float]:
    ms = {k: v * 1000 for k, v in raw.items()}
    g = ms.get
    out = {"propose": g("propose", 0.0) - g("draft fwd", 0.0), "draft fwd": g("draft fwd", 0.0),
           "schedule": g("schedule", 0.0), "verify inputs": g("verify inputs", 0.0),
           "target fwd": g("target fwd", 0.0), "reject": g("reject", 0.0),
           "verify rest": g("launch", 0.0) - g("verify inputs", 0.0) - g("target fwd", 0.0) - g("reject", 0.0),
           "update": g("update", 0.0), "collect": g("collect", 0.0)}
    step = step_s * 1000
    out["other"] = step - sum(out.values())
    out["host"] = step - out["draft fwd"] - out["target fwd"]
    out["step"] = step
    return out


def run_batch(engine: Engine, timer: StepTimer, batch: int, steps: int, prompt_len: int, seed: int) -> dict[str, Any]:
    vocab = engine.arch.vocab_size
    rng = np.random.default_rng(seed)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", rng.integers(10, vocab - 10, size=prompt_len).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=6 * steps + 64, ignore_eos=True))
    while engine.scheduler.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                              for r in engine.scheduler.running):
        engine.step()  # prefill everything first: only speculative decode steps are measured
        timer.end_step(record=False)
    for _ in range(3):
        engine.step()
        timer.end_step(record=False)
    rows: list[dict[str, float]] = []
    tokens = engine.metrics.generation_tokens_total
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - t
        rows.append(phases_of(timer.current, elapsed))
        timer.end_step(record=False)
    tokens = engine.metrics.generation_tokens_total - tokens
    for rid in list(engine.groups):
        engine.abort(rid)
    median = {p: statistics.median(r[p] for r in rows) for p in PHASES}
    return {"batch": batch, "steps": steps, "tokens_per_step": tokens / steps,
            "mean_step_ms": statistics.fmean(r["step"] for r in rows),
            "mean_host_ms": statistics.fmean(r["host"] for r in rows),
            **{p: median[p] for p in PHASES}}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama", help="tiny architecture (agentserve.testing.tiny)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--acceptance", type=float, default=0.8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: less noise on a shared CPU)")
    ap.add_argument("--eager-paths", action="store_true",
                    help="the CPU's own paths (ragged eager verification) instead of the GPU's padded graph paths")
    ap.add_argument("--label", default="", help="a note for RESULTS.md (e.g. before / after)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--record", action="store_true", help="append a line to benchmarks/RESULTS.md")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from agentserve.testing import tiny_model_cached

    model = str(tiny_model_cached(args.arch))
    with LLM(model, draft_model=model, num_speculative_tokens=args.k, spec_dynamic=False,
             spec_synthetic_acceptance=args.acceptance, device="cpu", dtype="float32",
             max_model_len=args.prompt_len + 6 * args.steps + 128, max_num_seqs=max(args.batch),
             async_scheduling=False) as llm:
        engine = llm.engine
        if not args.eager_paths:
            use_graph_paths(engine, args.k)
        timer = StepTimer()
        undo = instrument(engine, timer)
        try:
            rows = [run_batch(engine, timer, b, args.steps, args.prompt_len, seed=b) for b in args.batch]
        finally:
            undo()
    print(f"device: {device_name()}, torch threads {args.threads}; tiny {args.arch} as its own draft, "
          f"k = {args.k}, synthetic acceptance {args.acceptance}, {'eager' if args.eager_paths else 'graph'} paths")
    print("ms per speculative step (median over steps; host = step minus the two models' forwards)")
    print(f"{'batch':>5} {'tok/step':>8} " + " ".join(f"{p:>13}" for p in PHASES) + f" {'mean host':>10}")
    for r in rows:
        print(f"{r['batch']:>5} {r['tokens_per_step']:8.2f} " + " ".join(f"{r[p]:13.3f}" for p in PHASES)
              + f" {r['mean_host_ms']:10.3f}")
    command = command_line("spec_host.py", argv)
    write_json({"command": command, "device": device_name(), "label": args.label,
                "paths": "eager" if args.eager_paths else "graph (eager stand-ins)", "rows": rows},
               args.out, "spec_host")
    if args.record:
        figures = "; ".join(
            f"batch {r['batch']}: host {r['host']:.2f} ms/step (median; mean {r['mean_host_ms']:.2f}) of "
            f"{r['step']:.2f} ms, propose {r['propose']:.2f}, schedule {r['schedule']:.2f}, verify inputs "
            f"{r['verify inputs']:.2f}, reject {r['reject']:.2f}, verify rest {r['verify rest']:.2f}, update "
            f"{r['update']:.2f}, other {r['other']:.2f}; forwards draft {r['draft fwd']:.2f} target "
            f"{r['target fwd']:.2f}; {r['tokens_per_step']:.2f} tok/step" for r in rows)
        append_result(f"spec_host{' (' + args.label + ')' if args.label else ''}", command, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
