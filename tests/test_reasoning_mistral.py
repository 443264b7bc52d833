"""Magistral's reasoning (vLLM's `--reasoning-parser mistral`): `[THINK] ... [/THINK]` are special tokens in
Mistral's tokenizers, which a decode that skips special tokens drops, so the split saw no markers and the
thinking came back as content. Here a tiny Mistral whose tokenizer has the two markers as special tokens:
chat replies carry the thought as reasoning_content and the constrained answer alone as content (whole and
streamed, no marker or EOS text left in either), and the Responses API (session turns) gives a reasoning item."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from agentserve.grammar.interface import GrammarError
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached
from helpers.live_server import live_openai

REGEX = "(yes|no)"


@pytest.fixture(scope="module")
def magistral() -> Path:
    """The tiny Mistral with [THINK] / [/THINK] added as special tokens (inside its padded vocabulary)."""
    src = tiny_model_cached("mistral")
    dst = Path(str(src) + "-think")
    if not (dst / "config.json").exists():
        tmp = Path(str(dst) + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        tok = AutoTokenizer.from_pretrained(str(tmp))
        tok.add_tokens(["[THINK]", "[/THINK]"], special_tokens=True)
        tok.save_pretrained(str(tmp))
        tmp.rename(dst)
    return dst


def _end_id(path: Path) -> int:
    ids = AutoTokenizer.from_pretrained(str(path)).encode("[/THINK]", add_special_tokens=False)
    assert len(ids) == 1
    return ids[0]


def test_chat_replies_split_the_special_markers(magistral: Path) -> None:
    with live_openai(str(magistral), max_model_len=512, reasoning_parser="mistral") as client:
        body = dict(model="m", messages=[{"role": "user", "content": "Is it?"}], max_tokens=30,
                    logit_bias={str(_end_id(magistral)): 21}, extra_body={"guided_regex": REGEX})
        done = None
        for seed in range(10):
            out = client.chat.completions.create(**body, seed=seed)
            if out.choices[0].finish_reason == "stop":
                done, used = out, seed
                break
        assert done is not None
        message = done.choices[0].message
        thought = message.model_extra.get("reasoning_content")
        assert message.content in ("yes", "no") and isinstance(thought, str)
        assert "[THINK]" not in thought and "[/THINK]" not in thought and "</s>" not in message.content
        chunks = list(client.chat.completions.create(**body, seed=used, stream=True))
        streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert (streamed, content) == (thought, message.content)
        # The Responses API runs on session turns: the thought is a reasoning item, apart from any answer.
        r = client.responses.create(model="m", input="Is it?", max_output_tokens=30, temperature=1.0,
                                    extra_body={"seed": 1})
        assert r.output and r.output[0].type == "reasoning"
        texts = [part.text for item in r.output for part in (getattr(item, "content", None) or [])]
        assert texts and not any("[THINK]" in t or "[/THINK]" in t or "</s>" in t for t in texts)


def test_a_tokenizer_without_the_markers_is_refused() -> None:
    with pytest.raises(GrammarError, match="not one token"):
        LLM(str(tiny_model_cached("mistral")), device="cpu", dtype="float32", reasoning_parser="mistral")
