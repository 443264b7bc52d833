"""Draft models for speculative-decoding tests, built from the tiny models."""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from agentserve.testing import tiny_model_cached


def small_draft(arch: str) -> str:
    """Another random model with the same tokenizer: 1 layer, other hidden size and head shape (its
    KV pages have another shape than the target's; its proposals are almost never accepted)."""
    return str(tiny_model_cached(arch, seed=7, num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1,
                                 intermediate_size=64))


@functools.lru_cache(maxsize=None)
def noisy_draft(arch: str, noise: float = 0.1) -> str:
    """The target with noise added to every weight: a draft that agrees with it often, not always (two
    independent random models almost never share their top tokens)."""
    target = tiny_model_cached(arch)
    out = Path(tempfile.mkdtemp(prefix="noisy-draft-"))
    shutil.copytree(target, out, dirs_exist_ok=True)
    weights = load_file(str(target / "model.safetensors"))
    gen = torch.Generator().manual_seed(3)
    noisy = {name: w + noise * w.float().std().nan_to_num(0.0) * torch.randn(w.shape, generator=gen).to(w.dtype)
             for name, w in weights.items()}
    save_file(noisy, str(out / "model.safetensors"))
    return str(out)


@functools.lru_cache(maxsize=None)
def repadded_draft(arch: str, vocab_size: int) -> str:
    """The target itself with its embedding (and untied lm_head) cut or zero-padded to vocab_size rows: the
    same model under another padding, as a family's small and large checkpoints are (every proposal
    is the target's own token, so acceptance is 100% only if the ids line up)."""
    target = tiny_model_cached(arch)
    out = Path(tempfile.mkdtemp(prefix=f"repadded-draft-{vocab_size}-"))
    shutil.copytree(target, out, dirs_exist_ok=True)
    weights = load_file(str(target / "model.safetensors"))
    for name, w in weights.items():
        if "embed_tokens" in name or "lm_head" in name:
            resized = torch.zeros((vocab_size, *w.shape[1:]), dtype=w.dtype)
            rows = min(vocab_size, w.shape[0])
            resized[:rows] = w[:rows]
            weights[name] = resized
    save_file(weights, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["vocab_size"] = vocab_size
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def greedy_token_ids(model: str, prompts: list[list[int]], params: Any, **engine: Any) -> list[list[int]]:
    """The token ids an engine of `model` without speculation generates for `prompts` (the reference
    the speculative runs must equal); the engine is closed after."""
    from agentserve.llm import LLM

    llm = LLM(model, **engine)
    out = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    llm.close()
    return out


def speculative_token_ids(arch: str, proposer: str, prompts: list[Any], params: Any, **engine: Any) -> list[list[int]]:
    """The token ids the tiny `arch` model generates with speculation (`proposer`: "ngram", or "draft": its
    noisy copy, three tokens a step, no dynamic k); asserts that tokens were drafted. The engine is closed."""
    from agentserve.llm import LLM

    spec: dict[str, Any] = (dict(speculative_method="ngram", prompt_lookup_min=1) if proposer == "ngram"
                            else dict(draft_model=noisy_draft(arch)))
    llm = LLM(str(tiny_model_cached(arch)), num_speculative_tokens=3, spec_dynamic=False, **spec, **engine)
    out = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    assert llm.engine.metrics.spec_num_draft_tokens > 0
    llm.close()
    return out


def record_replays(graphs: Any) -> list[bool]:
    """Wraps a ContinuationGraphs' run() (worker/continuation_graphs.py): the returned list gets, per
    call, whether it replayed (drafts) or declined (None: the eager continuation ran instead)."""
    replayed: list[bool] = []
    original = graphs.run

    def counted(*args: Any, **kwargs: Any) -> Any:
        drafts = original(*args, **kwargs)
        replayed.append(drafts is not None)
        return drafts

    graphs.run = counted
    return replayed
