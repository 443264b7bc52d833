"""Logprobs in each endpoint's OpenAI shape: chat's `logprobs.content` list (token, logprob, bytes,
top_logprobs) and completions' parallel lists (tokens, token_logprobs, top_logprobs, text_offset)."""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

from agentserve.outputs import Logprob
from agentserve.grammar.tokenizer_info import UNICODE_TO_BYTE as BYTE_DECODER

Positions = Sequence[dict[int, Logprob]]


def _clamp(lp: float) -> float:
    return max(lp, -9999.0)  # -inf is not JSON


class LogprobFormatter:
    def __init__(self, tokenizer: Any, tokens_as_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        # vLLM's return_tokens_as_token_ids: a token is named "token_id:{id}" (its bytes stay its own).
        self.tokens_as_ids = tokens_as_ids

    def token_text(self, token_id: int, lp: Any) -> str:
        """The name a token is shown by: "token_id:{id}" under tokens_as_ids, else its decoded text."""
        if self.tokens_as_ids:
            return f"token_id:{token_id}"
        return self.decoded_text(token_id, lp)

    def decoded_text(self, token_id: int, lp: Any) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"token_id:{token_id}"

    def token_bytes(self, token_id: int, text: str) -> list[int]:
        """A token's own bytes: for a token that is part of a multi-byte character its decoded text is
        U+FFFD, so read the bytes off the vocabulary piece (byte-level BPE or sentencepiece <0xNN>)."""
        if "\ufffd" not in text or self.tokenizer is None:
            return list(text.encode("utf-8"))
        try:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
        except Exception:  # noqa: BLE001 - a tokenizer that cannot name the piece: fall back to the text
            piece = None
        if isinstance(piece, str) and piece:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                with contextlib.suppress(ValueError):
                    return [int(piece[3:5], 16)]
            if all(c in BYTE_DECODER for c in piece):
                return [BYTE_DECODER[c] for c in piece]
        return list(text.encode("utf-8"))

    def chat(self, token_ids: Sequence[int], positions: Positions, top_n: int) -> list[dict[str, Any]]:
        content = []
        for tid, pos in zip(token_ids, positions):
            lp = pos.get(tid)
            text = self.token_text(tid, lp)
            top_list: list[dict[str, Any]] = []
            for other_id, other in sorted(pos.items(), key=lambda kv: kv[1].rank):
                if 1 <= other.rank <= top_n and len(top_list) < top_n:
                    top_list.append({"token": self.token_text(other_id, other), "logprob": _clamp(other.logprob),
                                     "bytes": self.token_bytes(other_id, self.decoded_text(other_id, other))})
            # bytes are the token's own (OpenAI's definition) even when it is named "token_id:{id}": they are
            # what a client that asked for ids because the text is ambiguous rebuilds the text from.
            content.append({"token": text, "logprob": _clamp(lp.logprob if lp is not None else float("-inf")),
                            "bytes": self.token_bytes(tid, self.decoded_text(tid, lp)), "top_logprobs": top_list})
        return content

    def completion(self, token_ids: Sequence[int], positions: Sequence[Optional[dict[int, Logprob]]], top_n: int,
                   offset: int) -> dict[str, Any]:
        """`positions`: None for a position without logprobs (an echoed prompt's first token: its
        token_logprobs and top_logprobs entries are null, as OpenAI's)."""
        tokens: list[str] = []
        token_lps: list[Optional[float]] = []
        tops: list[Optional[dict[str, float]]] = []
        offsets: list[int] = []
        for tid, pos in zip(token_ids, positions):
            if pos is None:
                text = self.token_text(tid, None)
                tokens.append(text)
                token_lps.append(None)
                tops.append(None)
                offsets.append(offset)
                offset += len(text)
                continue
            lp = pos.get(tid)
            text = self.token_text(tid, lp)
            tokens.append(text)
            token_lps.append(_clamp(lp.logprob if lp is not None else float("-inf")))
            top: dict[str, float] = {}
            for other_id, other in sorted(pos.items(), key=lambda kv: kv[1].rank):
                if other_id == tid or 1 <= other.rank <= top_n:
                    top.setdefault(self.token_text(other_id, other), _clamp(other.logprob))
            tops.append(top)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def vllm_prompt_logprobs(positions: Optional[Sequence[Optional[dict[int, Logprob]]]]) -> Optional[list[Any]]:
    """vLLM's `prompt_logprobs` response field: per prompt token None (the first) or {token id: {logprob,
    rank, decoded_token}} for the prompt token and its top alternatives."""
    if positions is None:
        return None
    return [None if pos is None else {str(tid): {"logprob": _clamp(lp.logprob), "rank": lp.rank,
                                                 "decoded_token": lp.decoded_token} for tid, lp in pos.items()}
            for pos in positions]
