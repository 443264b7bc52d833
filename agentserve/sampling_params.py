"""Per-request sampling parameters and output constraints, validated on construction.

Validation here is the one place shared by HTTP, gRPC and the offline API: a value that passes it
must never fail later inside a step (where a failure would reach other requests). Every message
starts with the field it is about, so the servers can name it (HTTP `param`, gRPC's message)."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from agentserve.structured_outputs_params import GuidedDecodingParams, StructuredOutputsParams

_UNSET_MAX_TOKENS = 16
# Integers end up in int64 tensors or a torch.Generator seed: anything beyond int64 overflows there.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128
MAX_LOGIT_BIAS = 1024  # token ids one request may bias (OpenAI documents no bound; this one keeps a step's pairs small)
# Below this temperature logits / temperature overflows float32 to inf and the softmax gives NaN;
# vLLM clamps the same way (its _MAX_TEMP).
MIN_POSITIVE_TEMPERATURE = 1e-2
# The output constraints of which a request gives at most one (tools aside).
_CONSTRAINT_FIELDS = ("json_schema", "json_object", "regex", "choice", "grammar", "structural_tag")


class SamplingParamsError(ValueError):
    """A sampling parameter out of its range; `field` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name} {message}")
        self.field = field_name


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, lo: int, hi: int = INT64_MAX, what: str = "") -> None:
    if not _is_int(value) or not lo <= value <= hi:
        raise SamplingParamsError(name, f"must be an integer in [{lo}, {hi}]{what}, got {value!r}")


def _check_float(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise SamplingParamsError(name, f"must be a finite number, got {value!r}")
    return float(value)


def _check_text(name: str, value: Any) -> None:
    """Strings anywhere in value (nested lists/dicts, keys too) must encode as UTF-8: a lone
    surrogate such as "\\ud800" would otherwise fail later, in the tokenizer or a grammar compile."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise SamplingParamsError(name, f"is not valid UTF-8 text (character {e.start}: "
                                            "a lone surrogate); send valid Unicode") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(name, k)
            _check_text(name, v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_text(name, v)
    elif isinstance(value, float) and not math.isfinite(value):
        raise SamplingParamsError(name, "must not contain NaN or infinity")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled; at most the vocabulary size (Engine.validate checks that)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # A signed 64-bit integer, as vLLM's OpenAI server accepts (torch.iinfo(torch.long)).
    seed: Optional[int] = None
    max_tokens: Optional[int] = _UNSET_MAX_TOKENS  # None: up to max_model_len
    min_tokens: int = 0
    stop: Union[None, str, list[str]] = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # vLLM's: at most this many tokens of reasoning (needs a --reasoning-parser), then its end marker is forced.
    thinking_token_budget: Optional[int] = None
    # top-n logprobs per generated / prompt token (0: only the sampled or prompt token's; vLLM's -1: the whole
    # vocabulary, which the engine allows with max_logprobs -1)
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    # vLLM's: keep only the prompt's last k tokens (-1: the last max_model_len - 1, what the model can take).
    truncate_prompt_tokens: Optional[int] = None
    # OpenAI's logit_bias: token id -> value added to its logit before sampling (-100 bans, 100 forces).
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[list[int]] = None  # vLLM's: only these tokens may be sampled
    bad_words: Optional[list[str]] = None  # vLLM's: words the output may not contain (sampling/bad_words.py)
    skip_special_tokens: bool = True
    # vLLM's: with special tokens kept, whether decoding puts spaces between adjacent special tokens.
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's: False gives token ids only (text "", logprobs without decoded_token); stop strings need text.
    detokenize: bool = True
    # Output constraints (grammar/): at most one of these.
    json_schema: Union[None, str, dict[str, Any]] = None
    json_object: bool = False
    regex: Optional[str] = None
    grammar: Optional[str] = None  # a context-free grammar: GBNF / EBNF, or Lark with the llguidance backend
    choice: Optional[list[str]] = None
    # vLLM's structural tag (grammar/structural_tag.py): free text with constrained parts, a dict or its JSON text
    structural_tag: Union[None, str, dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[None, str, dict[str, Any]] = None
    parallel_tool_calls: bool = True
    # vLLM's offline forms of one constraint (agentserve/structured_outputs_params.py), read onto the fields above
    # when the object is built (then None, so that clone() does not read them twice).
    structured_outputs: Optional[StructuredOutputsParams] = None
    guided_decoding: Optional[StructuredOutputsParams] = None
    # vLLM's request-level backend name from those objects: the engine refuses one that is not its own.
    structured_outputs_backend: Optional[str] = None

    def __post_init__(self) -> None:
        if self.seed == -1 and not isinstance(self.seed, bool):
            self.seed = None  # vLLM's: -1 is no seed
        self._take_vllm_constraints()
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()
        # Each generated token is looked up in stop_token_ids, and allowed_token_ids becomes a mask at
        # every step, on the step thread: repeats (a client can send millions) would slow every request.
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(dict.fromkeys(self.allowed_token_ids))
        if 0.0 < self.temperature < MIN_POSITIVE_TEMPERATURE:
            self.temperature = MIN_POSITIVE_TEMPERATURE
        object.__setattr__(self, "_built", True)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        # vLLM code sets a constraint on built params (`params.structured_outputs = StructuredOutputsParams(...)`,
        # after clone() too): read it onto the fields as __post_init__ does, or it would be silently ignored.
        if name in ("structured_outputs", "guided_decoding") and value is not None and self.__dict__.get("_built"):
            self._take_vllm_constraints()
            self._validate_constraints()

    def _take_vllm_constraints(self) -> None:
        for keyword in ("structured_outputs", "guided_decoding"):
            given = getattr(self, keyword)
            if given is None:
                continue
            if not isinstance(given, StructuredOutputsParams):
                raise SamplingParamsError(keyword, "must be a StructuredOutputsParams (or GuidedDecodingParams), "
                                                   f"not {type(given).__name__}")
            taken = [n for n in _CONSTRAINT_FIELDS if getattr(self, n) not in (None, False)]
            if taken:
                raise SamplingParamsError(keyword, f"gives a constraint and so does {taken[0]}: give one")
            for name, value in given.sampling_fields(keyword).items():
                setattr(self, name, value)
            setattr(self, keyword, None)

    def _validate(self) -> None:
        self._validate_numbers()
        self._validate_lists_and_text()
        self._validate_constraints()

    def _validate_numbers(self) -> None:
        def bad(name: str, msg: str) -> None:
            raise SamplingParamsError(name, msg)

        _check_int("n", self.n, 1, MAX_N)
        if _check_float("temperature", self.temperature) < 0:
            bad("temperature", f"must be >= 0, got {self.temperature}")
        if not 0.0 < _check_float("top_p", self.top_p) <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, 0, what=" (0 or -1: disabled)")
        if not 0.0 <= _check_float("min_p", self.min_p) <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if _check_float("repetition_penalty", self.repetition_penalty) <= 0:
            bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if not -2.0 <= _check_float("presence_penalty", self.presence_penalty) <= 2.0:
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= _check_float("frequency_penalty", self.frequency_penalty) <= 2.0:
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if self.seed is not None:
            _check_int("seed", self.seed, INT64_MIN, INT64_MAX, " (a signed 64-bit integer)")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT64_MAX):
            bad("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0 or (
                self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad("min_tokens", f"must be in [0, max_tokens], got {self.min_tokens!r}")
        # Their upper bound is the engine's max_logprobs (engine/validation.py: validate_logprobs).
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, -1, what=" (-1: the whole vocabulary)")
        if self.truncate_prompt_tokens is not None and (not _is_int(self.truncate_prompt_tokens) or not (
                self.truncate_prompt_tokens == -1 or 1 <= self.truncate_prompt_tokens <= INT64_MAX)):
            bad("truncate_prompt_tokens", f"must be a positive integer or -1 (the model's limit), got "
                                          f"{self.truncate_prompt_tokens!r}")
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, -1, what=" (-1: the whole vocabulary)")
        if self.thinking_token_budget is not None:
            _check_int("thinking_token_budget", self.thinking_token_budget, 0)
        self._validate_logit_bias()

    def _validate_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise SamplingParamsError("logit_bias", f"must map at most {MAX_LOGIT_BIAS} token ids to biases")
        for token, value in self.logit_bias.items():
            if not _is_int(token) or not 0 <= token <= INT64_MAX:
                raise SamplingParamsError("logit_bias", f"keys must be token ids (non-negative integers), got {token!r}")
            if not -100.0 <= _check_float("logit_bias", value) <= 100.0:
                raise SamplingParamsError("logit_bias", f"values must be in [-100, 100], got {value!r} for token {token}")

    def _validate_lists_and_text(self) -> None:
        if any(not isinstance(s, str) or not s for s in self.stop):  # type: ignore[union-attr]
            raise SamplingParamsError("stop", "strings must be non-empty strings")
        if self.stop and not self.detokenize:
            raise SamplingParamsError("stop", "strings are matched in the output text: they need detokenize=True "
                                              "(or end the output with stop_token_ids)")
        _check_text("stop", self.stop)
        if any(not _is_int(t) or not 0 <= t <= INT64_MAX for t in self.stop_token_ids):
            raise SamplingParamsError("stop_token_ids", "must be non-negative integers")
        if self.allowed_token_ids is not None and (
                not isinstance(self.allowed_token_ids, (list, tuple)) or not self.allowed_token_ids
                or any(not _is_int(t) or not 0 <= t <= INT64_MAX for t in self.allowed_token_ids)):
            raise SamplingParamsError("allowed_token_ids", "must be a non-empty list of token ids (non-negative "
                                                           "integers)")
        if self.bad_words is not None and (not isinstance(self.bad_words, (list, tuple)) or any(
                not isinstance(w, str) or not w.strip() for w in self.bad_words)):
            raise SamplingParamsError("bad_words", "must be a list of non-empty strings")
        _check_text("bad_words", self.bad_words)
        for name in ("json_schema", "regex", "grammar", "choice", "structural_tag", "tools", "tool_choice"):
            _check_text(name, getattr(self, name))

    def _validate_constraints(self) -> None:
        # Tools combine with json_schema / json_object: "tool calls, or a final answer matching the
        # schema" (agent frameworks send both on their typed path); never with regex or choice.
        answers = [self.json_schema is not None, self.json_object]
        others = [self.regex is not None, self.choice is not None, self.grammar is not None,
                  self.structural_tag is not None]
        if sum(answers + others) > 1 or (self.tools_active and any(others)):
            raise ValueError("at most one of json_schema, json_object, regex, choice, grammar and structural_tag may "
                             "be given (tools combine only with json_schema or json_object)")
        if self.structural_tag is not None and not isinstance(self.structural_tag, (str, dict)):
            raise SamplingParamsError("structural_tag", "must be an object or its JSON text")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise SamplingParamsError("grammar", "must be a non-empty string (GBNF / EBNF, or Lark)")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise SamplingParamsError("choice", "must be a non-empty list of strings")
        if self.tool_choice is not None and not self.tools and self.tool_choice != "none":
            raise SamplingParamsError("tool_choice", "needs tools")
        if isinstance(self.json_schema, dict):
            try:
                json.dumps(self.json_schema, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise SamplingParamsError("json_schema", f"is not JSON-serializable: {e}") from None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def tools_active(self) -> bool:
        """Whether the output may call tools (tools given, tool_choice not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def typed_answer(self) -> bool:
        """Tools together with a json_schema / json_object final answer."""
        return self.tools_active and (self.json_schema is not None or self.json_object)

    @property
    def has_constraint(self) -> bool:
        return (self.json_schema is not None or self.json_object or self.regex is not None
                or self.choice is not None or self.grammar is not None or self.structural_tag is not None
                or self.tools_active)

    def clone(self, **changes: Any) -> "SamplingParams":
        """A deep copy with `changes` (vLLM's clone: changing the copy's logit_bias leaves this one's alone)."""
        values = copy.deepcopy({f: getattr(self, f) for f in self.__dataclass_fields__})
        values.update(changes)
        return SamplingParams(**values)


__all__ = ["SamplingParams", "SamplingParamsError", "StructuredOutputsParams", "GuidedDecodingParams"]
