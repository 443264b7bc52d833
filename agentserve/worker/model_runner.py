"""Turns a scheduled step into flat tensors, runs the model, samples on the device.

One host sync per step: the sampled ids (and logprobs, when asked) come back together, through
a LaunchedStep that the engine may read after launching the next step (async scheduling).
"""

from __future__ import annotations

import gc

import logging
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch

from agentserve.cache.device_ops import DeviceOp, PageStore, PageStores, execute_device_ops
from agentserve.cache.kv_cache import KVCache, bytes_per_block, kv_cache_torch_dtype
from agentserve.config import EngineConfig
from agentserve.request import Request
from agentserve.lora.layers import enable_lora
from agentserve.lora.warmup import warmup_lora_kernels
from agentserve.model.arch_config import ArchConfig, ModelLoadError
from agentserve.model.attention import ForwardMetadata
from agentserve.model.layers import rope_cos_sin_cache
from agentserve.model.loader import build_model
from agentserve.parallel.rank import TensorParallelRank
from agentserve.sampling.rejection import RejectionSampler
from agentserve.sampling.sampler import Sampler, SamplingMetadata, draw_noise
from agentserve.spec.device_drafts import materialize_drafts
from agentserve.spec.draft import DraftModel
from agentserve.worker.cuda_graph import DecodeGraphs
from agentserve.worker.prompt_logprobs import PromptLogprobRows, PromptScores, plan_prompt_logprob_rows, score_prompt_rows
from agentserve.worker.input_batch import build_sampling_metadata
from agentserve.worker.kv_scales import calibrate_kv_scales
from agentserve.worker.launched_step import LaunchedStep
from agentserve.worker.spec_verify import padded_verification_inputs, sample_verification
from agentserve.worker.spec_graphs import capture_spec_graphs
# ScheduledChunk lives with the input builder; engine code imports it from here as before.
from agentserve.worker.step_inputs import ScheduledChunk, StepInputs, build_step_inputs
from agentserve.worker.verify_graphs import VerifyGraphs

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, arch: ArchConfig, device: torch.device, dtype: torch.dtype,
                 model_path: Optional[Path], max_model_len: int,
                 draft: Optional[tuple[ArchConfig, Optional[Path]]] = None,
                 parallel: Optional[TensorParallelRank] = None) -> None:
        """`draft`: the draft model's shape and directory (speculative decoding with a draft model);
        it is loaded before the KV pool is sized, and its KV layers share the pool's page ids.
        `parallel`: this rank under tensor parallelism (parallel/); rank 0's sends each step to the others."""
        self.parallel = parallel
        self.config = config
        self.arch = arch
        self.device = device
        self.dtype = dtype
        self.block_size = config.cache.block_size
        self.max_model_len = max_model_len
        self.model = build_model(arch, dtype, device, model_path, config.model.load_format, config.model.seed,
                                 quantization=config.model.quantization,
                                 tp=self.parallel.shard if self.parallel is not None else None)
        self.kv_heads_per_rank = self.model.decoder_layer(0).self_attn.num_kv_heads  # all of them at tp 1
        self.kv_dtype = kv_cache_torch_dtype(config.cache.kv_cache_dtype, dtype)  # fp8: half the bytes per page
        self.model.set_rope_cache(rope_cos_sin_cache(arch.head_dim, arch.rope_theta, arch.rope_scaling,
                                                     max_model_len, device))
        if self.kv_dtype != dtype and not self.model.kv_scales_loaded:  # fp8 pages: calibrated per-layer scales
            calibrate_kv_scales(self.model, dtype, device, max_model_len)
        # Multi-LoRA: slots wired into the projections before profiling and graph capture (both see them).
        self.lora_manager = enable_lora(self.model, arch, config.lora, dtype, device)
        self.draft: Optional[DraftModel] = None
        if draft is not None:
            self.draft = DraftModel(draft[0], draft[1], dtype, device, config.model.load_format, config.model.seed,
                                    max_model_len, self.block_size, config.scheduler.max_num_batched_tokens,
                                    target_vocab_size=arch.vocab_size, quantization=config.spec.draft_quantization)
        self.sampler = Sampler()
        # vLLM's --seed: requests without their own seed draw from this, so that the same requests in the
        # same order sample the same tokens after a restart (and the engine's draws are its own: code
        # sharing the process and torch's default generator does not shift them).
        self.sampling_generator = torch.Generator(device=device).manual_seed(config.model.seed)
        self.rejection_sampler = RejectionSampler(config.spec.spec_synthetic_acceptance)
        self.num_blocks = self._decide_num_blocks()
        if self.parallel is not None:
            self.num_blocks = self.parallel.agree_num_blocks(self.num_blocks)
        swap_blocks = int(config.cache.swap_space_gb * 2**30 // self._block_bytes())
        self.kv_cache = KVCache(arch.num_layers, self.num_blocks, self.block_size, self.kv_heads_per_rank,
                                arch.head_dim, self.kv_dtype, device, num_swap_blocks=swap_blocks)
        self.pages: PageStore = self.kv_cache
        # Recorded on the step's stream once a launch's inputs are uploaded (the paced swap-in copies wait for it).
        self._inputs_uploaded: Optional[torch.cuda.Event] = None
        if self.draft is not None:
            self.pages = PageStores([self.kv_cache, self.draft.allocate_cache(self.num_blocks, swap_blocks)])
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.graphs: Optional[DecodeGraphs] = None
        self.verify_graphs: Optional[VerifyGraphs] = None
        # The last step's sampling rows (weakly: see _sampling_metadata) and their metadata.
        self._sampling_cache: Optional[tuple[list["weakref.ref[Request]"], SamplingMetadata]] = None
        if self._use_cuda_graphs():
            self.graphs = DecodeGraphs(self.model, self.kv_cache.layers, config.scheduler.max_num_seqs,
                                       self.max_blocks_per_seq, max_model_len, device,
                                       lora=self.lora_manager is not None)
            self.graphs.capture()  # under tensor parallelism, on every rank: the ranks replay together
            if self.parallel is None:  # verification replays (and the draft's graphs) are rank 0's alone
                self.verify_graphs = capture_spec_graphs(config, self.model, self.kv_cache.layers, self.draft,
                                                         self.max_blocks_per_seq, max_model_len, device, self.graphs.pool)
        if self.device.type == "cuda":
            from agentserve.kernels.paged_attention import warmup_unified_variants

            k0, v0 = self.kv_cache.layers[0]
            warmup_unified_variants(k0, v0, self.model.decoder_layer(0).self_attn.num_heads, dtype,
                                    config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens)
            if self.lora_manager is not None:  # no Triton compile mid-serving for any step size
                warmup_lora_kernels(self.lora_manager, config.scheduler.max_num_batched_tokens)
            if config.spec.method is not None:
                from agentserve.kernels.greedy_verify import warmup_greedy_verify

                warmup_greedy_verify(self.device, config.spec.num_speculative_tokens + 1)

    def close(self) -> None:
        """Releases the device memory the runner holds: the CUDA graphs (and their memory pool), the
        KV pages, the pinned swap space, the weights. The runner cannot run a step afterwards."""
        self.graphs = None
        self.verify_graphs = None
        self._sampling_cache = None
        self.kv_cache.release()
        if self.draft is not None:
            self.draft.release()
        if self.lora_manager is not None:
            self.lora_manager.release()  # the LoRA layers' views go with the model below
        self.model = self.model.to("meta")  # drops the weights' storage; the module stays typed
        if self.parallel is not None:
            self.parallel.shutdown()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            gc.collect()  # blocks held only by a reference cycle are freed before the cache goes back
            torch.cuda.empty_cache()

    def _use_cuda_graphs(self) -> bool:
        from agentserve.kernels import HAS_TRITON, get_backend

        # The torch reference attention has data-dependent shapes and cannot be captured.
        return self.device.type == "cuda" and not self.config.enforce_eager and HAS_TRITON and get_backend() != "torch"

    # --- sizing -------------------------------------------------------------------------------------
    def _block_bytes(self) -> int:
        a = self.arch
        target = bytes_per_block(a.num_layers, self.block_size, self.kv_heads_per_rank, a.head_dim, self.kv_dtype)
        return target + (self.draft.block_bytes() if self.draft is not None else 0)

    def _decide_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type != "cuda":
            return max(1, int(cache.cpu_kv_cache_gb * 2**30 // self._block_bytes()))
        return self._profile_num_blocks()

    def _profile_num_blocks(self) -> int:
        """Runs one forward at the largest batch, then gives the KV cache what is left of
        gpu_memory_utilization of the device memory."""
        # An engine dropped without close() and held only by a reference cycle still owns its KV pool
        # until the cycle collector runs; collect now so that its memory does not count as used.
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len)
        dummy_cache = KVCache(self.arch.num_layers, 1, self.block_size, self.kv_heads_per_rank,
                              self.arch.head_dim, self.kv_dtype, self.device)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(num_tokens, device=self.device)
        # One prompt of num_tokens tokens over a one-page cache (every table entry is page 0, no KV
        # writes): the activations peak as in the largest prefill step.
        meta = ForwardMetadata(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.long, device=self.device),
            block_tables=torch.zeros((1, -(-num_tokens // self.block_size)), dtype=torch.int32, device=self.device),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            max_query_len=num_tokens, max_seq_len=num_tokens)
        with torch.inference_mode():
            hidden = self.model(ids, positions, dummy_cache.layers, meta)
            # Logits rows: one per sequence, k + 1 per sequence verifying speculative tokens.
            spec = self.config.spec
            rows_per_seq = 1 + (spec.num_speculative_tokens if spec.method is not None else 0)
            logits = self.model.compute_logits(hidden[-self.config.scheduler.max_num_seqs * rows_per_seq:])
            del hidden, logits
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.config.cache.gpu_memory_utilization - used_by_others - peak
        num_blocks = int(budget // self._block_bytes())
        if num_blocks < 1 or num_blocks * self.block_size < self.max_model_len:
            raise ModelLoadError(
                f"the model does not fit: after weights and activations ({peak / 2**30:.1f} GiB) only "
                f"{max(budget, 0) / 2**30:.2f} GiB remain for the KV cache, fewer than max_model_len="
                f"{self.max_model_len} tokens; raise gpu_memory_utilization or lower max_model_len")
        logger.info("KV cache: %d pages of %d tokens (%.1f GiB)", num_blocks, self.block_size,
                    num_blocks * self._block_bytes() / 2**30)
        return num_blocks

    # --- one step ---------------------------------------------------------------------------------
    def prepare(self, chunks: list[ScheduledChunk], prev: Optional[LaunchedStep] = None) -> StepInputs:
        """Flat inputs of a step (worker/step_inputs.py). A decode whose input token was sampled by
        `prev` (still in flight under async scheduling) reads it from prev.sampled on the device."""
        return build_step_inputs(chunks, self.block_size, self.device, self.lora_manager, prev)

    def _sampling_metadata(self, sampling: list[Request]) -> SamplingMetadata:
        """The previous step's metadata when the same requests sample in the same order and nothing
        in it changes per step (penalty counts and min_tokens bans do): decode batches mostly repeat,
        and this skips rebuilding and copying the columns. The tensors are only read by the sampler."""
        cached = self._sampling_cache
        if (cached is not None and len(cached[0]) == len(sampling)
                and all(ref() is req for ref, req in zip(cached[0], sampling))):
            return cached[1]
        meta = build_sampling_metadata(sampling, self.arch.vocab_size, self.device,
                                       unseeded_generator=self.sampling_generator)
        reusable = (meta.output_counts is None and meta.banned_rows is None
                    and not any(r.bad_words_token_ids for r in sampling))
        # Weak references: the cache outlives the step, and strong ones kept the last batch's finished
        # requests (token lists, detokenizers, grammar matchers, logprobs) alive on an idle server until
        # the next step. A dead reference (None) never matches a live request, so identity stays exact.
        self._sampling_cache = ([weakref.ref(r) for r in sampling], meta) if reusable else None
        return meta

    def _forward_logits(self, chunks: list[ScheduledChunk],
                        prev: Optional[LaunchedStep]) -> tuple[Optional[torch.Tensor], Optional[PromptScores]]:
        """The sampled rows' logits, and the prompt logprobs that rows of this step score (if any)."""
        plan = plan_prompt_logprob_rows(chunks)
        input_ids, positions, meta, logits_indices = self.prepare(chunks, prev)
        if self.device.type == "cuda":  # the step's uploads are queued: paced swap-in copies start after them
            self._inputs_uploaded = torch.cuda.Event()
            self._inputs_uploaded.record()
        if self.parallel is not None:  # sends the step to the other ranks, then runs this rank's share
            if plan is None:
                return self.parallel.run_forward(self.model, self.kv_cache.layers, input_ids, positions, meta,
                                                 logits_indices, self.graphs), None
            return self._parallel_forward_with_prompt_rows(input_ids, positions, meta, logits_indices, plan)
        decode_only = meta.max_query_len == 1 and logits_indices.shape[0] == len(chunks)  # all sample
        if decode_only and self.graphs is not None and self.graphs.padded_size(len(chunks)) is not None:
            return self.graphs.run(input_ids, positions, meta.slot_mapping, meta.block_tables, meta.seq_lens,
                                   meta.max_seq_len, meta.lora_slot_indices), None
        hidden = self.model(input_ids, positions, self.kv_cache.layers, meta)
        scores = None
        if plan is not None:
            rows = torch.tensor(plan.flat_indices, dtype=torch.int64, device=self.device)
            scores = PromptScores(plan, score_prompt_rows(
                lambda lo, hi: self.model.compute_logits(hidden[rows[lo:hi]]), plan, self.device))
        if logits_indices.numel() == 0:
            return None, scores
        return self.model.compute_logits(hidden[logits_indices]), scores

    def _parallel_forward_with_prompt_rows(self, input_ids: torch.Tensor, positions: torch.Tensor,
                                           meta: ForwardMetadata, logits_indices: torch.Tensor,
                                           plan: PromptLogprobRows) -> tuple[Optional[torch.Tensor], PromptScores]:
        """Tensor parallel: the ranks compute the logits of the sampled and the prompt rows together,
        in ascending flat order (the order a decode graph's rows come in, should the step replay one)."""
        assert self.parallel is not None
        prompt_rows = torch.tensor(plan.flat_indices, dtype=torch.int64, device=self.device)
        merged, _ = torch.sort(torch.cat([logits_indices, prompt_rows]))
        logits = self.parallel.run_forward(self.model, self.kv_cache.layers, input_ids, positions, meta, merged,
                                           self.graphs)
        assert logits is not None
        prompt_logits = logits[torch.searchsorted(merged, prompt_rows)]
        scores = PromptScores(plan, score_prompt_rows(lambda lo, hi: prompt_logits[lo:hi], plan, self.device))
        if logits_indices.numel() == 0:
            return None, scores
        return logits[torch.searchsorted(merged, logits_indices)], scores

    @torch.inference_mode()
    def execute_device_ops(self, ops: list[DeviceOp]) -> None:
        """Page copies and swaps, in order on the step's stream (on every rank); each leaves `ops` once it ran."""
        if self.parallel is not None:
            self.parallel.send_device_ops(ops)
        execute_device_ops(self.pages, ops)

    def execute_idle_device_ops(self, ops: list[DeviceOp]) -> None:
        """A step without a forward (nothing schedulable): its device ops, then the swap-in copies held back
        for a step's uploads (cache/swap_in_pacer.py) go at once, since none are coming."""
        self.execute_device_ops(ops)
        self.pages.no_step_launched()

    def swap_in_ready(self, ticket: int) -> bool:
        """Whether the copy of a started swap in (cache/device_ops.SwapInStart) has arrived in this
        rank's staging buffers (a finish would not wait for it). Other ranks' finishes wait for their
        own copies on their streams, so this rank's answer only paces admission."""
        return self.pages.swap_in_ready(ticket)

    def _launch_verification(self, chunks: list[ScheduledChunk], mask_fn: Optional[Callable[..., Optional[torch.Tensor]]],
                             prev: Optional[LaunchedStep]) -> LaunchedStep:
        """A step where some rows verify speculative tokens: one sampling row per request, scored at
        its last k + 1 positions by the rejection sampler (worker/spec_verify.py)."""
        rows = [c for c in chunks if c.num_sampled]
        requests = [c.request for c in rows]
        meta_s = self._sampling_metadata(requests)  # its grammar masks are per scored position: passed apart
        q = max(c.num_tokens for c in chunks)
        # The verification graphs are captured without LoRA: steps with adapter rows run eager (prepare
        # fills their slot indices), so the target applies each request's adapter.
        lora_rows = self.lora_manager is not None and any(c.request.lora_key is not None for c in chunks)
        logits: Optional[torch.Tensor]  # _forward_logits types its logits Optional (None: no row samples)
        if (self.verify_graphs is not None and not lora_rows and self.verify_graphs.padded_size(len(chunks), q) is not None
                and all(c.num_tokens == c.num_sampled and c.request.num_computed_tokens < c.request.num_tokens
                        for c in chunks)):
            # Only verification and decode rows, their inputs all on the host: a graph replay.
            padded, spec = padded_verification_inputs(requests, [c.spec_token_ids for c in rows], q,
                                                      self.block_size, self.max_model_len, self.device)
            hidden = self.verify_graphs.run(padded, q)
            logits = self.model.compute_logits(hidden.index_select(0, padded.real_index))
            scores = None  # only verification and decode rows: no prefill chunk scores its prompt
        else:
            # The eager step builds its inputs on the host: drafts left on the device come back first.
            materialize_drafts(requests, [c.spec_token_ids for c in rows])
            (logits, scores), spec = self._forward_logits(chunks, prev), None
        assert logits is not None
        step = sample_verification(self.rejection_sampler, logits, requests, [c.spec_token_ids for c in rows],
                                   meta_s, mask_fn, spec)
        step.prompt_scores = scores
        return step

    @torch.inference_mode()
    def launch(self, chunks: list[ScheduledChunk], device_ops: list[DeviceOp],
               token_bitmask_fn: Optional[Callable[[list[Request]], Optional[torch.Tensor]]] = None,
               prev: Optional[LaunchedStep] = None) -> LaunchedStep:
        """Queues one step (device ops, forward, sampling, the copy of the sampled ids to the host)
        and returns without waiting for it. `token_bitmask_fn(sampling requests)` builds grammar masks
        on the CPU; it is called after the forward has been queued, so mask building overlaps it.
        `prev`: the step launched before this one, whose sampled ids feed this step's decodes."""
        self._inputs_uploaded = None
        step = self._launch(chunks, device_ops, token_bitmask_fn, prev)
        # Swap-in copies held back so far follow this step's uploads to the copy engine (cache/swap_in_pacer.py).
        self.pages.step_launched(self._inputs_uploaded)
        return step

    def _launch(self, chunks: list[ScheduledChunk], device_ops: list[DeviceOp],
                token_bitmask_fn: Optional[Callable[[list[Request]], Optional[torch.Tensor]]],
                prev: Optional[LaunchedStep]) -> LaunchedStep:
        self.execute_device_ops(device_ops)  # first: the forward reads what swaps in and copies write
        if any(c.spec_token_ids for c in chunks):
            step = self._launch_verification(chunks, token_bitmask_fn, prev)
            if self.lora_manager is not None:
                self.lora_manager.step_launched()  # later loads into this step's slots wait for it
            return step
        # One sampling row per sampled position: a request verifying k tokens fills k + 1 rows.
        sampling = [c.request for c in chunks for _ in range(c.num_sampled)]
        row_counts = [c.num_sampled for c in chunks if c.num_sampled]
        # Sampling inputs are staged before the forward is launched, so their copies queue behind it.
        meta_s = self._sampling_metadata(sampling) if sampling else None
        logits, scores = self._forward_logits(chunks, prev)
        if self.lora_manager is not None:
            self.lora_manager.step_launched()  # later loads into this step's slots wait for it
        if logits is None or meta_s is None:
            return LaunchedStep(None, {}, [], prompt_scores=scores)
        noise = None
        if token_bitmask_fn is not None and not meta_s.all_greedy:
            # The mask callback may first wait for the previous step's tokens (async scheduling,
            # engine/launch.py); the sampling noise needs nothing from them (one kernel per seeded
            # row), so it is queued now, while the host would otherwise wait, not after the masks.
            noise = draw_noise(logits.shape[0], logits.shape[1], meta_s.generators, logits.device,
                               meta_s.unseeded_generator)
        bitmask = token_bitmask_fn(sampling) if token_bitmask_fn is not None else None
        if bitmask is not None and self.device.type == "cuda":
            bitmask = bitmask.pin_memory().to(self.device, non_blocking=True)
        # A copy with this step's mask: the metadata may be cached for the next step, the mask never is.
        out = self.sampler(logits, replace(meta_s, token_bitmask=bitmask), noise)
        # A request's last sampling row: the next step's decode input when it has no speculative
        # tokens (steps with speculative rows are processed before the next one is scheduled).
        rows = {req.request_id: row for row, req in enumerate(sampling)}
        if out.logprobs is None:
            return LaunchedStep(out.sampled_token_ids, rows, row_counts, prompt_scores=scores)
        assert out.logprob_token_ids is not None and out.sampled_ranks is not None
        packed = torch.cat([out.sampled_token_ids[:, None].double(), out.sampled_ranks[:, None].double(),
                            out.logprob_token_ids.double(), out.logprobs.double()], dim=1)
        return LaunchedStep(out.sampled_token_ids, rows, row_counts, packed, out.logprobs.shape[1],
                            prompt_scores=scores)
