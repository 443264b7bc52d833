"""The grammar backend interface: constraint specs, tokenizer info, compiled grammars and matchers.

The engine's view (see also `state.py` and `compiler.py`):

    spec = ConstraintSpec.from_sampling_params(params, tool_format=fmt)   # None: unconstrained
    info = TokenizerInfo.from_hf(tokenizer, vocab_size=model_vocab, eos_token_ids=eos_ids)  # once
    compiler = GrammarCompiler(get_backend("auto"), info)                 # once per engine
    future = compiler.submit(spec)            # off the step loop; result() -> CompiledGrammar
    matcher = future.result().new_matcher()   # one per sequence
    matcher.fill_bitmask(bitmask, row)        # bitmask: int32 [batch, ceil(vocab/32)], CPU
    matcher.accept_token(token_id)            # after sampling; False: not allowed, state unchanged
    matcher.is_terminated()                   # nothing more can follow: finish ("stop")

Bitmask convention (shared with llguidance/xgrammar): bit `i % 32` of word `i // 32` set means token
`i` is allowed. EOS bits are set only in accepting states; padded ids (model vocab wider than the
tokenizer) and special tokens the grammar does not name are never set.
"""

from __future__ import annotations

import abc
import hashlib
import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from agentserve.sampling_params import SamplingParams

CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "choice", "tool_calls")

# JSON whitespace policy: bounded. Compact and single-spaced JSON (what json.dumps and chat
# templates write for tool calls) fit; unbounded whitespace would let an unsure (or random) model
# pad forever instead of finishing the object. outlines-core: at most one space between JSON
# tokens (this pattern); llguidance: compact or one space after ':' and ','; xgrammar: at most
# one whitespace character (and, for JSON constraints, no raw control characters at all).
JSON_WHITESPACE = r"[ ]?"

# Marker strings of the tool-call formats; when a tokenizer has them as single (special) tokens,
# tool-call grammars may name them (and only tool-call grammars do).
TOOL_MARKERS = ("<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]")


class GrammarError(ValueError):
    """A constraint that cannot be compiled (unsupported keyword, bad regex, time-out, ...)."""


def canonical_json(obj: Any) -> str:
    """Compact JSON with key order preserved (property order matters to generation order)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_token_bitmask(batch: int, vocab_size: int, *, pin_memory: Optional[bool] = None) -> torch.Tensor:
    """An int32 [batch, ceil(vocab/32)] CPU bitmask, all tokens allowed (-1)."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    try:
        return torch.full((batch, bitmask_words(vocab_size)), -1, dtype=torch.int32, pin_memory=pin_memory)
    except RuntimeError:  # pinning unavailable
        return torch.full((batch, bitmask_words(vocab_size)), -1, dtype=torch.int32)


def _as_int32(word: int) -> int:
    word &= 0xFFFFFFFF
    return word - (1 << 32) if word >= (1 << 31) else word


# --------------------------------------------------------------------------------------------
# Constraint specs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConstraintSpec:
    """What a request's output must match. Frozen and hashable: the compile-cache key.

    kind: "json_schema" (payload: canonical JSON of the schema), "json_object" (payload ""),
    "regex" (payload: the pattern), "choice" (payload: tuple of strings), "tool_calls" (payload:
    canonical JSON of a tool-call structure built by `grammar.tools.build_tool_constraint`).
    """

    kind: str
    payload: Union[str, tuple[str, ...]]

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise GrammarError(f"unknown constraint kind {self.kind!r}; expected one of {CONSTRAINT_KINDS}")
        if self.kind == "choice":
            if not isinstance(self.payload, tuple) or not self.payload:
                raise GrammarError("choice needs a non-empty tuple of strings")
        elif not isinstance(self.payload, str):
            raise GrammarError(f"{self.kind} payload must be a string")

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def json_schema(cls, schema: Union[str, dict, bool]) -> "ConstraintSpec":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"json_schema is not valid JSON: {e}") from None
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise GrammarError(f"json_schema must be a JSON object, got {type(schema).__name__}")
        try:
            return cls("json_schema", canonical_json(schema))
        except (TypeError, ValueError) as e:
            raise GrammarError(f"json_schema is not JSON-serializable: {e}") from None

    @classmethod
    def json_object(cls) -> "ConstraintSpec":
        return cls("json_object", "")

    @classmethod
    def regex(cls, pattern: str) -> "ConstraintSpec":
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError("regex must be a non-empty string")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> "ConstraintSpec":
        choices = tuple(choices)
        if not choices or not all(isinstance(c, str) for c in choices):
            raise GrammarError("choice must be a non-empty list of strings")
        return cls("choice", choices)

    @classmethod
    def from_sampling_params(cls, params: "SamplingParams", tool_format: Optional[str] = None
                             ) -> Optional["ConstraintSpec"]:
        """The request's constraint, or None when its output is unconstrained.

        `tool_format` ("hermes" | "llama3_json" | "mistral", see `tools.detect_tool_format`) is
        needed when the request has tools (and tool_choice is not "none")."""
        if params.json_schema is not None:
            return cls.json_schema(params.json_schema)
        if params.json_object:
            return cls.json_object()
        if params.regex is not None:
            return cls.regex(params.regex)
        if params.choice is not None:
            return cls.choice(params.choice)
        if params.tools and params.tool_choice != "none":
            from agentserve.grammar.tools import build_tool_constraint

            if tool_format is None:
                raise GrammarError("request has tools but the model's tool-call format is unknown "
                                   "(pass tool_format, see grammar.tools.detect_tool_format)")
            return build_tool_constraint(params.tools, params.tool_choice or "auto", tool_format,
                                         parallel=getattr(params, "parallel_tool_calls", True))
        return None


# --------------------------------------------------------------------------------------------
# Tokenizer info
# --------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}  # byte-level BPE symbol -> byte
_UNICODE_TO_BYTE = UNICODE_TO_BYTE


def _decoder_kind(hf_tokenizer: Any) -> str:
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "unknown"
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except Exception:
        return "unknown"

    def kinds(d: dict) -> list[str]:
        if d.get("type") == "Sequence":
            return [k for sub in d.get("decoders", []) for k in kinds(sub)]
        return [d.get("type", "")]

    found = kinds(decoder)
    if "ByteLevel" in found:
        return "byte_level"
    if "ByteFallback" in found or "Metaspace" in found:
        return "sentencepiece"
    return "unknown"


class TokenizerInfo:
    """Per-tokenizer facts every backend needs, built once per (tokenizer, model vocab size).

    token_bytes[i]: the bytes token i stands for (special tokens: their text). vocab_size: the
    model's logits width (>= len(tokenizer); ids past the tokenizer are padding, never allowed).
    """

    def __init__(self, token_bytes: list[bytes], *, vocab_size: int, eos_token_ids: Sequence[int],
                 special_ids: Sequence[int], hf_tokenizer: Any = None, name: str = "") -> None:
        if vocab_size < len(token_bytes):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(token_bytes)} tokens)")
        eos = tuple(dict.fromkeys(int(e) for e in eos_token_ids))
        if not eos:
            raise ValueError("the tokenizer has no EOS token; pass eos_token_ids")
        if any(not 0 <= e < vocab_size for e in eos):
            raise ValueError(f"EOS ids {eos} out of range for vocab_size {vocab_size}")
        self.token_bytes = token_bytes
        self.tokenizer_vocab_size = len(token_bytes)
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = eos
        self.special_ids = frozenset(int(i) for i in special_ids)
        self.hf_tokenizer = hf_tokenizer
        self.name = name
        self._lock = threading.Lock()
        self._cache: dict[Any, Any] = {}
        self._text_to_id: Optional[dict[bytes, int]] = None
        h = hashlib.sha256()
        h.update(f"{self.vocab_size}|{eos}|{sorted(self.special_ids)}|".encode())
        for b in token_bytes:
            h.update(len(b).to_bytes(4, "little"))
            h.update(b)
        self.identity = h.hexdigest()[:32]

    @classmethod
    def from_hf(cls, tokenizer: Any, vocab_size: Optional[int] = None,
                eos_token_ids: Optional[Sequence[int]] = None) -> "TokenizerInfo":
        """From a Hugging Face tokenizer (fast tokenizers: byte-level BPE or sentencepiece-style)."""
        n = len(tokenizer)
        kind = _decoder_kind(tokenizer)
        added = {int(i): t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        special = {i for i, t in added.items() if getattr(t, "special", False)}
        special |= set(getattr(tokenizer, "all_special_ids", []) or [])
        id_to_tok = tokenizer.convert_ids_to_tokens(list(range(n)))
        token_bytes: list[bytes] = []
        for i, tok in enumerate(id_to_tok):
            if tok is None:
                token_bytes.append(b"")
            elif i in added:
                token_bytes.append(str(added[i]).encode("utf-8"))
            elif kind == "byte_level":
                try:
                    token_bytes.append(bytes(_UNICODE_TO_BYTE[c] for c in tok))
                except KeyError:
                    token_bytes.append(tok.encode("utf-8"))
            elif kind == "sentencepiece":
                if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                    token_bytes.append(bytes([int(tok[3:5], 16)]))
                else:
                    token_bytes.append(tok.replace("\u2581", " ").encode("utf-8"))
            else:
                token_bytes.append(tokenizer.convert_tokens_to_string([tok]).encode("utf-8"))
        if eos_token_ids is None:
            eos = tokenizer.eos_token_id
            eos_token_ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        name = getattr(tokenizer, "name_or_path", "") or ""
        return cls(token_bytes, vocab_size=vocab_size or n, eos_token_ids=eos_token_ids,
                   special_ids=sorted(special), hf_tokenizer=tokenizer, name=str(name))

    # -- helpers --------------------------------------------------------------------------------
    def single_token_id(self, text: str) -> Optional[int]:
        """The id of the one token whose text is exactly `text` (added/special tokens first)."""
        if self._text_to_id is None:
            m: dict[bytes, int] = {}
            for i, b in enumerate(self.token_bytes):
                if b and (b not in m or i in self.special_ids):
                    m[b] = i
            self._text_to_id = m
        return self._text_to_id.get(text.encode("utf-8"))

    def marker_ids(self) -> frozenset[int]:
        """Ids of single tokens that spell a tool-call marker (`<tool_call>`, `[TOOL_CALLS]`, ...)."""
        return frozenset(i for m in TOOL_MARKERS if (i := self.single_token_id(m)) is not None)

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """Per-tokenizer cache for backend objects (library tokenizers, vocabularies)."""
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        value = build()
        with self._lock:
            return self._cache.setdefault(key, value)

    def eos_words(self) -> tuple["np.ndarray", "np.ndarray"]:
        """(word indices, int32 bit masks) of the EOS ids, one entry per distinct word."""

        def build() -> tuple[np.ndarray, np.ndarray]:
            acc: dict[int, int] = {}
            for e in self.eos_token_ids:
                acc[e >> 5] = acc.get(e >> 5, 0) | (1 << (e & 31))
            words = np.array(sorted(acc), dtype=np.int64)
            bits = np.array([_as_int32(acc[w]) for w in sorted(acc)], dtype=np.int32)
            return words, bits

        return self.cached("eos_words", build)

    def forbidden_words(self, allow_markers: bool) -> "np.ndarray":
        """int32 [words]: bits of ids never allowed by a grammar (padding, special tokens other
        than EOS; with allow_markers, tool-marker tokens stay allowed). EOS bits are clear."""

        def build() -> np.ndarray:
            bad = set(range(self.tokenizer_vocab_size, self.vocab_size))
            bad |= set(self.special_ids) - set(self.eos_token_ids)
            if allow_markers:
                bad -= self.marker_ids()
            words = [0] * bitmask_words(self.vocab_size)
            for i in bad:
                words[i >> 5] |= 1 << (i & 31)
            return np.array([_as_int32(w) for w in words], dtype=np.int32)

        return self.cached(("forbidden", allow_markers), build)


# --------------------------------------------------------------------------------------------
# Backend interface
# --------------------------------------------------------------------------------------------


class GrammarMatcher(abc.ABC):
    """Per-sequence grammar state. Not thread-safe; one owner at a time.

    EOS handling is common to all backends: an EOS token is accepted iff the state is accepting,
    after which the matcher is terminated; `fill_bitmask` sets EOS bits iff `is_accepting()`.
    """

    def __init__(self, tokenizer_info: TokenizerInfo) -> None:
        self.tokenizer_info = tokenizer_info
        self._eos_accepted = False
        self.num_tokens = 0  # tokens accepted (EOS included)

    # -- backend hooks ------------------------------------------------------------------------
    @abc.abstractmethod
    def _accept(self, token_id: int) -> bool:
        """Advance over a non-EOS token; False (state unchanged) if not allowed."""

    @abc.abstractmethod
    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed non-EOS tokens into bitmask[row] (EOS bits are fixed up after)."""

    @abc.abstractmethod
    def _rollback(self, num_tokens: int) -> None: ...

    @abc.abstractmethod
    def _copy(self) -> "GrammarMatcher": ...

    @abc.abstractmethod
    def _is_accepting(self) -> bool: ...

    @abc.abstractmethod
    def _cannot_continue(self) -> bool:
        """True when no non-EOS token can follow (output complete)."""

    # -- public API -----------------------------------------------------------------------------
    def accept_token(self, token_id: int) -> bool:
        """Advance over `token_id`. False if the grammar does not allow it; the state is unchanged."""
        if self._eos_accepted:
            return False
        token_id = int(token_id)
        if token_id in self.tokenizer_info.eos_token_ids:
            if not self._is_accepting():
                return False
            self._eos_accepted = True
            self.num_tokens += 1
            return True
        if not 0 <= token_id < self.tokenizer_info.tokenizer_vocab_size:
            return False
        if self._accept(token_id):
            self.num_tokens += 1
            return True
        return False

    def accept_tokens(self, token_ids: Sequence[int]) -> int:
        """Accept tokens in order until one is refused; returns how many were accepted."""
        n = 0
        for t in token_ids:
            if not self.accept_token(t):
                break
            n += 1
        return n

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Fill bitmask[row] (int32, CPU, contiguous rows) with the tokens allowed next."""
        if bitmask.dtype != torch.int32 or bitmask.dim() != 2 or bitmask.device.type != "cpu":
            raise ValueError("bitmask must be a 2-D int32 CPU tensor")
        if bitmask.shape[1] != bitmask_words(self.tokenizer_info.vocab_size):
            raise ValueError(f"bitmask has {bitmask.shape[1]} words per row, expected "
                             f"{bitmask_words(self.tokenizer_info.vocab_size)} for vocab {self.tokenizer_info.vocab_size}")
        if self._eos_accepted:
            bitmask[row].zero_()
        else:
            self._fill(bitmask, row)
        self._fix_eos(bitmask, row, self._eos_accepted or self._is_accepting())

    def _fix_eos(self, bitmask: torch.Tensor, row: int, allow: bool) -> None:
        words, bits = self.tokenizer_info.eos_words()
        arr = bitmask.numpy()
        if allow:
            arr[row, words] |= bits
        else:
            arr[row, words] &= ~bits

    def is_accepting(self) -> bool:
        """The output so far is complete and valid: EOS may be emitted (or was)."""
        return self._eos_accepted or self._is_accepting()

    def is_terminated(self) -> bool:
        """Nothing more can follow: EOS was accepted, or the grammar allows no further token."""
        return self._eos_accepted or (self._is_accepting() and self._cannot_continue())

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (speculative drafts, jump-forward)."""
        if num_tokens < 0 or num_tokens > self.num_tokens:
            raise ValueError(f"cannot roll back {num_tokens} tokens ({self.num_tokens} accepted)")
        if num_tokens == 0:
            return
        n = num_tokens
        if self._eos_accepted:
            self._eos_accepted = False
            n -= 1
        if n:
            self._rollback(n)
        self.num_tokens -= num_tokens

    def copy(self) -> "GrammarMatcher":
        """An independent matcher in the same state (forks, speculative drafting)."""
        other = self._copy()
        other._eos_accepted = self._eos_accepted
        other.num_tokens = self.num_tokens
        return other


def bitmask_to_ids(row: torch.Tensor, vocab_size: int) -> list[int]:
    bits = (row.to(torch.int64).unsqueeze(-1) >> torch.arange(32)) & 1
    ids = torch.nonzero(bits.flatten()[:vocab_size]).flatten()
    return ids.tolist()


class CompiledGrammar(abc.ABC):
    """A constraint compiled for one tokenizer; immutable, shared by all its matchers."""

    def __init__(self, spec: ConstraintSpec, tokenizer_info: TokenizerInfo, backend_name: str) -> None:
        self.spec = spec
        self.tokenizer_info = tokenizer_info
        self.backend_name = backend_name

    @abc.abstractmethod
    def new_matcher(self) -> GrammarMatcher: ...


class GrammarBackend(abc.ABC):
    name: str = "?"

    @abc.abstractmethod
    def compile(self, spec: ConstraintSpec, tokenizer_info: TokenizerInfo) -> CompiledGrammar:
        """Compile `spec`; raises GrammarError naming the cause when it is not supported."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

BACKEND_NAMES = ("llguidance", "outlines", "xgrammar")

# The default ("auto") backend: llguidance, chosen by what benchmarks/grammar.py measured over all
# 350 schemas of shared/data/schemas/sample.jsonl (tiny llama3 tokenizer, 1008 tokens / 1024
# logits; 10 s per-schema compile limit; 2 random walks per compiled schema, every finished walk
# validated with jsonschema; 2 CPU cores):
#
#   backend      covered (every walk valid)   compile p50 / p95 / max       mask+accept us/token p50
#   llguidance   333/350 (95%)                1.0 ms / 3.3 ms / 30 ms        8
#   xgrammar     315/350 (90%)                1.6 ms / 49 ms / 426 ms        9
#   outlines     276/350 (79%), 5 time-outs   2.6 ms / 1.6 s / 8.6 s         6
#
# "Covered" counts schemas that compile AND whose outputs all validate: xgrammar and outlines-core
# accept keywords they do not enforce (bounds, uniqueItems, allOf, required-but-undeclared
# properties, oneOf as anyOf, ...), which produced invalid outputs on 17 (xgrammar) and 21
# (outlines) schemas before their backends were made to reject those keywords
# (schema_utils.check_enforceable); llguidance rejects what it cannot enforce by itself and never
# produced an invalid output. llguidance thus has the highest real coverage, the fastest and most
# predictable compiles (no schema near the time limit, vs. seconds and time-outs for outlines),
# a per-token cost on par with the others, and native support for the free-text-then-trigger
# tool-call grammars (lazy lexemes, special tokens). The others stay selectable (--grammar-backend).
# With a 128k-token (Llama-3-sized, synthetic) vocabulary on a subset (50 schemas; 20 for outlines)
# the gap widens: compile p50 llguidance 1.4 ms, xgrammar 41 ms, outlines 307 ms (max 13 s); mask +
# accept per token p50/p95 llguidance 11/81 us, xgrammar 313 us/20 ms, outlines 165/187 us.
DEFAULT_BACKEND = "llguidance"


def get_backend(name: str = "auto", **options: Any) -> GrammarBackend:
    """A backend by name: "llguidance", "outlines", "xgrammar", or "auto" (= DEFAULT_BACKEND)."""
    key = (name or "auto").lower().replace("-", "_")
    if key == "auto":
        key = DEFAULT_BACKEND
    if key in ("outlines", "outlines_core"):
        from agentserve.grammar.outlines_backend import OutlinesBackend

        return OutlinesBackend(**options)
    if key == "llguidance":
        from agentserve.grammar.llguidance_backend import LLGuidanceBackend

        return LLGuidanceBackend(**options)
    if key == "xgrammar":
        from agentserve.grammar.xgrammar_backend import XGrammarBackend

        return XGrammarBackend(**options)
    raise ValueError(f"unknown grammar backend {name!r}; expected one of {('auto',) + BACKEND_NAMES}")
