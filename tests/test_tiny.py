"""Tiny model directories (agentserve.testing.tiny): load with transformers, sane configs and
tokenizers, append-consistent chat templates, and weights that decode greedily without near-ties."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from agentserve.testing import ARCHS, NAMED_SHAPES, make_tiny_model, tiny_model_cached
from agentserve.testing import tiny

hf_logging.disable_progress_bar()

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        },
    },
]


def _call(cid: str, name: str, args: Any) -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


# system, user, assistant tool call (dict args), tool, assistant; then parallel calls with JSON-string
# arguments, two consecutive tool results, assistant text and a final user turn.
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [_call("call00001", "get_weather", {"city": "Paris"})]},
    {"role": "tool", "tool_call_id": "call00001", "content": '{"temperature": 21, "conditions": "sunny"}'},
    {"role": "assistant", "content": "It is 21 °C and sunny in Paris."},
    {"role": "user", "content": "And Oslo? Also show me notes.txt."},
    {
        "role": "assistant",
        "content": "Checking both.",
        "tool_calls": [
            _call("call00002", "get_weather", '{"city": "Oslo", "unit": "c"}'),
            _call("call00003", "read_file", '{"path": "notes.txt"}'),
        ],
    },
    {"role": "tool", "tool_call_id": "call00002", "content": '{"temperature": -3}'},
    {"role": "tool", "tool_call_id": "call00003", "content": "buy milk\n"},
    {"role": "assistant", "content": "Oslo is at -3 °C; the note says: buy milk."},
    {"role": "user", "content": "Thanks!"},
]

UNICODE_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  \n\n\ttabs\r\nCRLF ",
    "héllo wörld — naïve café, São Paulo, Zürich; 你好，世界；こんにちは；안녕하세요; привет; مرحبا",
    "emoji 🙂🚀👍🏽 👨‍👩‍👧 flags 🇫🇷 math ∑∫√π ≈ 3.14159 ≠ 3",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}  <tool_call> [INST] </s>',
    "\u0000\u0001\x7f\u200b zero-width and control chars \ufeff",
    "def f(x):\n    return x ** 2  # comment\n",
]


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(arch: str) -> Path:
    return tiny_model_cached(arch)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)


def test_files_and_config(arch: str, model_dir: Path, tokenizer: Any) -> None:
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json"):  # fmt: skip
        assert (model_dir / f).is_file(), f
    raw = json.loads((model_dir / "config.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == tokenizer.chat_template
    cfg = AutoConfig.from_pretrained(model_dir)
    assert cfg.vocab_size % 64 == 0 and cfg.vocab_size > len(tokenizer)  # padded vocab
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    tied = arch in ("llama3", "qwen2")
    assert raw["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in names) is not tied
    assert any(n.endswith("self_attn.q_proj.bias") for n in names) is (arch == "qwen2")
    assert any(n.endswith("self_attn.q_norm.weight") for n in names) is (arch == "qwen3")
    if arch == "llama3":
        assert raw["rope_theta"] == 500000.0
        assert raw["rope_scaling"]["rope_type"] == "llama3" and raw["rope_scaling"]["factor"] == 8.0
        assert raw["rope_scaling"]["original_max_position_embeddings"] < raw["max_position_embeddings"]
        assert cfg.rope_parameters["rope_type"] == "llama3"  # transformers 5 reads the legacy keys
    else:
        assert raw["rope_scaling"] is None
    if arch == "qwen3":
        assert cfg.head_dim == 32 and cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads
    if arch == "mistral":
        assert raw["sliding_window"] is None
    gen = json.loads((model_dir / "generation_config.json").read_text())
    eos_ids = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert tokenizer.eos_token_id in eos_ids
    end_of_turn = {"llama": "</s>", "llama3": "<|eot_id|>", "mistral": "</s>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>"}
    assert tokenizer.eos_token == end_of_turn[arch]


def test_model_loads_and_ties(arch: str, model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (emb.data_ptr() == head.data_ptr()) is (arch in ("llama3", "qwen2"))


def test_tokenizer_roundtrip(arch: str, model_dir: Path, tokenizer: Any) -> None:
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in UNICODE_TEXTS:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        # AutoTokenizer (Qwen2Tokenizer for qwen) and the raw tokenizer.json must agree
        assert ids == raw.encode(text, add_special_tokens=False).ids
        expected = unicodedata.normalize("NFC", text) if arch.startswith("qwen") else text
        assert tokenizer.decode(ids) == expected
    with_bos = tokenizer("hi").input_ids
    assert (with_bos[0] == tokenizer.bos_token_id) is (arch in ("llama", "llama3", "mistral"))


def _render(tok: Any, messages: list[dict[str, Any]], gen: bool = False, tools: Any = TOOLS) -> str:
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)


@pytest.mark.parametrize("tools", [TOOLS, None], ids=["tools", "no-tools"])
@pytest.mark.parametrize("system", [True, False], ids=["system", "no-system"])
def test_chat_template_append_consistent(arch: str, tokenizer: Any, tools: Any, system: bool) -> None:
    conv = CONVERSATION if system else CONVERSATION[1:]
    prev_text: str | None = None
    prev_ids: list[int] | None = None
    for k in range(1, len(conv) + 1):
        text = _render(tokenizer, conv[:k], tools=tools)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if prev_text is not None and prev_ids is not None:
            assert text.startswith(prev_text), f"k={k}: not a string prefix"
            # boundaries sit next to special tokens, so it also holds token by token
            assert ids[: len(prev_ids)] == prev_ids, f"k={k}: not a token prefix"
        with_prompt = _render(tokenizer, conv[:k], gen=True, tools=tools)
        assert with_prompt.startswith(text)
        prev_text, prev_ids = text, ids
    full = prev_text or ""
    # the structure the tool-call parsers rely on
    if tools:
        assert "get_weather" in full and "read_file" in full
    calls = {
        "llama": '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}; {"name": "read_file"',
        "llama3": '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}; {"name": "read_file"',
        "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}, "id": "call00002"}, ',
        "qwen2": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>\n<tool_call>',
        "qwen3": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>\n<tool_call>',
    }
    assert calls[arch] in full
    assert '"city": "Paris"' in full  # dict arguments serialised as JSON
    results = {"llama": "<tool_response>", "llama3": "<|start_header_id|>ipython<|end_header_id|>",
               "mistral": "[TOOL_RESULTS]", "qwen2": "<tool_response>", "qwen3": "<tool_response>"}  # fmt: skip
    assert full.count(results[arch]) == 3
    prompt = _render(tokenizer, conv, gen=True, tools=tools)
    gen_prompt = {"llama": "", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n", "mistral": "",
                  "qwen2": "<|im_start|>assistant\n", "qwen3": "<|im_start|>assistant\n"}  # fmt: skip
    assert prompt == full + gen_prompt[arch]


def test_chat_template_content_parts(tokenizer: Any) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    plain = [{"role": "user", "content": "Hello there"}]
    assert _render(tokenizer, parts) == _render(tokenizer, plain)


def test_greedy_generation_is_varied_and_separated(arch: str, model_dir: Path, tokenizer: Any) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for prompt in ("The harbor town woke slowly.", '{"name": "get_weather", "arguments": {'):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(
            ids, max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True,
            eos_token_id=None, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        new = out.sequences[0, ids.shape[1] :].tolist()
        assert len(new) == 24 and len(set(new)) >= 4, new
        assert max(new) < len(tokenizer)  # padded vocab rows are never chosen
        for logits in out.logits[:6]:
            top2 = torch.topk(logits[0].float(), 2).values
            assert float(top2[0] - top2[1]) > 1e-4


def test_sharded_checkpoint_matches_single_file(tmp_path: Path) -> None:
    single = tiny_model_cached("qwen3")
    sharded = make_tiny_model(tmp_path / "sharded", "qwen3", shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (sharded / "model.safetensors").exists()
    total = 0
    for fname in files:
        with safe_open(str(sharded / fname), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118
                assert index["weight_map"][k] == fname
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    a = AutoModelForCausalLM.from_pretrained(single)(ids).logits
    b = AutoModelForCausalLM.from_pretrained(sharded)(ids).logits
    assert torch.equal(a, b)  # same seed, same weights


def test_dtype_bfloat16(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "bf16", "llama3", dtype="bfloat16", num_layers=1)
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())  # noqa: SIM118


def test_tokenizer_training_is_deterministic() -> None:
    first = tiny._trained_bpe_json("qwen")
    tiny._trained_bpe_json.cache_clear()
    assert tiny._trained_bpe_json("qwen") == first


def test_cache_keys_and_reuse() -> None:
    a = tiny_model_cached("llama", num_layers=1)
    assert tiny_model_cached("llama", num_layers=1) == a
    b = tiny_model_cached("llama", num_layers=1, seed=1)
    assert a != b and (b / "config.json").is_file()


@pytest.mark.parametrize("name", sorted(NAMED_SHAPES))
def test_named_shapes_build_configs(name: str) -> None:
    shape = NAMED_SHAPES[name]
    cfg = AutoConfig.for_model(shape["model_type"], **{k: v for k, v in shape.items() if k != "model_type"})
    assert cfg.architectures == shape["architectures"]
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size  # true for all six families
    assert cfg.tie_word_embeddings is shape["tie_word_embeddings"]
