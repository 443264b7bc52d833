"""Grammar test and benchmark helpers: random walks through matchers (uniformly random allowed
tokens), and a worker process that compiles JSON schemas and validates the walks' outputs (a
native compile cannot be interrupted in-process, so a stuck one is killed with its process)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import time
from pathlib import Path
from typing import Any, Optional

import jsonschema
import numpy as np

from agentserve import SamplingParams
from agentserve.grammar.interface import GrammarError, allocate_token_bitmask
from agentserve.grammar.registry import BACKEND_NAMES, get_backend
from agentserve.grammar.spec import ConstraintSpec
from agentserve.grammar.tokenizer_info import TokenizerInfo
from agentserve.testing.tiny import tiny_model_cached


def available_backends() -> list[str]:
    """The grammar backends installed here (a backend whose package is missing raises GrammarError)."""
    available = []
    for name in BACKEND_NAMES:
        try:
            get_backend(name)
        except GrammarError:
            continue
        available.append(name)
    return available


def default_tokenizer_dir(arch: str = "llama3") -> Path:
    """A tiny model's directory (its tokenizer has the chat formats' special tokens)."""
    return Path(tiny_model_cached(arch))


def load_tokenizer(path: Optional[os.PathLike] = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or default_tokenizer_dir()))


# --------------------------------------------------------------------------------------------
# Random walks: drive a matcher with uniformly random allowed tokens (tests, benchmarks)
# --------------------------------------------------------------------------------------------


class WalkResult:
    __slots__ = ("tokens", "finished", "step_seconds")

    def __init__(self, tokens: list, finished: bool, step_seconds: list) -> None:
        self.tokens = tokens          # generated ids, EOS excluded
        self.finished = finished      # ended by EOS or termination (False: hit the cap)
        self.step_seconds = step_seconds  # per token: fill_bitmask + accept_token


def decode(info, tokens) -> str:
    """The exact text of generated tokens (their bytes joined; special tokens as their text)."""
    return b"".join(info.token_bytes[t] for t in tokens).decode("utf-8", errors="replace")


def allowed_ids(row, vocab_size: int):
    bits = np.unpackbits(row.numpy().view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits)


def random_walk(matcher, rng, *, max_tokens: int = 400, eos_prob: float = 0.5, bitmask=None) -> WalkResult:
    """Pick uniformly random allowed tokens until EOS/termination or `max_tokens`.

    Once the state is accepting, EOS is picked with probability `eos_prob` (prefer finishing).
    Every token the mask allows must be accepted by the matcher (checked)."""
    info = matcher.tokenizer_info
    if bitmask is None:
        bitmask = allocate_token_bitmask(1, info.vocab_size, pin_memory=False)
    eos = set(info.eos_token_ids)
    tokens: list[int] = []
    steps: list[float] = []
    for _ in range(max_tokens):
        if matcher.is_terminated():
            return WalkResult(tokens, True, steps)
        t0 = time.perf_counter()
        matcher.fill_bitmask(bitmask, 0)
        t1 = time.perf_counter()
        ids = allowed_ids(bitmask[0], info.vocab_size)
        if len(ids) == 0:
            raise AssertionError(f"empty mask after {len(tokens)} tokens")
        eos_allowed = [e for e in info.eos_token_ids if _has(bitmask[0], e)]
        if eos_allowed and (rng.random() < eos_prob or len(ids) == len(eos_allowed)):
            tok = eos_allowed[0]
        else:
            tok = int(ids[rng.randrange(len(ids))])
            while tok in eos:
                tok = int(ids[rng.randrange(len(ids))])
        t2 = time.perf_counter()
        if not matcher.accept_token(tok):
            raise AssertionError(f"matcher refused token {tok} that its own mask allowed")
        steps.append((t1 - t0) + (time.perf_counter() - t2))
        if tok in eos:
            return WalkResult(tokens, True, steps)
        tokens.append(tok)
    return WalkResult(tokens, matcher.is_terminated(), steps)


def _has(row, token_id: int) -> bool:
    return bool((int(row[token_id >> 5]) >> (token_id & 31)) & 1)


# --------------------------------------------------------------------------------------------
# Schema sample runs: compile + random walks + jsonschema validation (tests, benchmarks)
# --------------------------------------------------------------------------------------------


def tokenizer_info_for(model_dir) -> "tuple[object, object]":
    """(HF tokenizer, TokenizerInfo) of a model/tokenizer directory: the model's vocab size and
    EOS ids come from config.json / generation_config.json when present."""
    model_dir = Path(model_dir)
    tok = load_tokenizer(model_dir)
    vocab = None
    eos = None
    if (model_dir / "config.json").exists():
        vocab = json.loads((model_dir / "config.json").read_text()).get("vocab_size")
    if (model_dir / "generation_config.json").exists():
        e = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id")
        eos = e if isinstance(e, list) else ([e] if e is not None else None)
    if vocab is not None and vocab < len(tok):
        vocab = None
    return tok, TokenizerInfo.from_hf(tok, vocab_size=vocab, eos_token_ids=eos)


def schema_walks(compiled, schema, tok=None, *, walks: int, max_tokens: int, seed: int) -> dict:
    """Random walks through a compiled JSON-schema grammar, each output json-parsed and validated.
    Returns {"walks": [{"status": valid|cap|invalid|invalid_json|walk_error|schema_error, ...}],
    "step_us": [per-token fill+accept microseconds]}."""
    try:
        validator = jsonschema.validators.validator_for(schema)(schema)
        schema_error = None
    except Exception as e:  # the schema itself is broken for jsonschema
        validator, schema_error = None, f"{type(e).__name__}: {e}"[:200]
    results = []
    step_us: list = []
    for w in range(walks):
        rng = random.Random(seed * 1000 + w)
        try:
            res = random_walk(compiled.new_matcher(), rng, max_tokens=max_tokens)
        except AssertionError as e:
            results.append({"status": "walk_error", "detail": str(e)[:200]})
            continue
        step_us += [s * 1e6 for s in res.step_seconds]
        if not res.finished:
            results.append({"status": "cap", "tokens": len(res.tokens)})
            continue
        text = decode(compiled.tokenizer_info, res.tokens)
        try:
            value = json.loads(text)
        except ValueError as e:
            results.append({"status": "invalid_json", "detail": f"{e}: {text[:300]!r}"})
            continue
        if validator is None:
            results.append({"status": "schema_error", "detail": schema_error})
            continue
        errors = list(validator.iter_errors(value))
        if errors:
            results.append({"status": "invalid", "detail": f"{errors[0].message[:200]} in {text[:300]!r}"})
        else:
            results.append({"status": "valid", "tokens": len(res.tokens)})
    return {"walks": results, "step_us": step_us}


def _schema_worker(conn, backend_name: str, model_dir, walks: int, max_tokens: int) -> None:
    tok, info = tokenizer_info_for(model_dir)
    backend = get_backend(backend_name)
    conn.send(("ready", info.vocab_size))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        idx, schema = msg
        t0 = time.perf_counter()
        try:
            compiled = backend.compile(ConstraintSpec.json_schema(schema), info)
        except GrammarError as e:
            conn.send(("error", idx, time.perf_counter() - t0, str(e)[:300]))
            continue
        except Exception as e:  # a library crash: not covered
            conn.send(("error", idx, time.perf_counter() - t0, f"{type(e).__name__}: {e}"[:300]))
            continue
        conn.send(("compiled", idx, time.perf_counter() - t0))
        out = schema_walks(compiled, schema, tok, walks=walks, max_tokens=max_tokens, seed=idx)
        conn.send(("walked", idx, out["walks"], out["step_us"]))


class SchemaWorker:
    """A worker process that compiles schemas and walks them; killed and restarted when a compile
    or the walks exceed their time limit (native compiles cannot be interrupted in-process)."""

    def __init__(self, backend: str, model_dir, *, walks: int = 2, max_tokens: int = 1000,
                 start_method: str = "spawn") -> None:
        self.args = (backend, str(model_dir), walks, max_tokens)
        self.start_method = start_method
        self.proc = None
        self.conn = None
        self.vocab = 0

    def start(self) -> None:
        ctx = mp.get_context(self.start_method)
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_schema_worker, args=(child, *self.args), daemon=True)
        self.proc.start()
        self.conn = parent
        if not parent.poll(300):
            self.kill()
            raise RuntimeError("schema worker did not start")
        _, self.vocab = parent.recv()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()
        self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.conn.send(None)
                self.proc.join(5)
            finally:
                self.kill()

    def run(self, idx: int, schema, compile_timeout: float, walk_timeout: float = 60.0) -> dict:
        """{"status": compiled|error|timeout, "compile_s", "error"?, "walks"?, "step_us"?}"""
        if self.proc is None:
            self.start()
        self.conn.send((idx, schema))
        if not self.conn.poll(compile_timeout):
            self.kill()
            return {"status": "timeout", "compile_s": None}
        msg = self.conn.recv()
        if msg[0] == "error":
            return {"status": "error", "compile_s": msg[2], "error": msg[3]}
        out = {"status": "compiled", "compile_s": msg[2]}
        if not self.conn.poll(walk_timeout):
            self.kill()
            out.update(walks=[{"status": "walk_timeout"}], step_us=[])
            return out
        _, _, walks, step_us = self.conn.recv()
        out.update(walks=walks, step_us=step_us)
        return out

    def __enter__(self) -> "SchemaWorker":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def assert_sampled_outputs_validate(llm: Any, schema: dict, *, seed: int, max_tokens: int) -> None:
    """Twelve sampled outputs of the tiny model under a json_schema constraint: at least half finish, and every
    one that does validates against `schema` (the original, before any backend rewrite)."""
    params = SamplingParams(n=12, temperature=1.0, seed=seed, max_tokens=max_tokens, json_schema=schema)
    outs = llm.generate("Answer in JSON:", params)[0].outputs
    finished = [c for c in outs if c.finish_reason == "stop"]
    assert len(finished) >= 6, [(c.finish_reason, c.text) for c in outs]
    for c in finished:
        jsonschema.validate(json.loads(c.text), schema)
