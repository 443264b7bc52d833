"""A PEFT adapter over a GGUF base: the real SmolLM2 GGUF (its odd shapes: 9 query heads, 3 KV heads, head
dim 64), an adapter trained as PEFT makes one on the model transformers loads from the same file (read once and
saved: the smollm2_gguf_as_transformers_dir fixture), served by
the engine that dequantized the file itself. Greedy tokens equal PEFT's merged model in fp32, in a batch
mixed with base rows whose tokens equal the base model's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agentserve import SamplingParams
from agentserve.llm import LLM

pytestmark = pytest.mark.real_model

CHATS = [[{"role": "user", "content": "Tell me a fact about cats."}],
         [{"role": "user", "content": "What is 2 + 2?"}]]
NEW_TOKENS = 16


def greedy(model: torch.nn.Module, ids: list[int]) -> list[int]:
    """NEW_TOKENS argmax tokens with transformers' KV cache, through the end-of-turn token as the engine's
    ignore_eos does (generate's min_new_tokens would instead forbid that token until the length is reached)."""
    tokens: list[int] = []
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        for _ in range(NEW_TOKENS):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def test_a_peft_adapter_over_the_gguf_base_matches_peft_merged(smollm2_gguf: Path, smollm2_gguf_as_transformers_dir: Path,
                                                               tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_gguf_as_transformers_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_gguf_as_transformers_dir, dtype=torch.float32).eval()
    prompts = [tok(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"] for chat in CHATS]
    base_tokens = [greedy(base, ids) for ids in prompts]

    torch.manual_seed(0)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                             lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # B large enough that the adapter changes the greedy tokens
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(5.0)
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload()
    adapter_tokens = [greedy(merged, ids) for ids in prompts]
    assert adapter_tokens != base_tokens  # the test can tell the adapter's rows from the base's

    llm = LLM(str(smollm2_gguf), device="cpu", dtype="float32", enable_lora=True, max_lora_rank=16)
    llm.load_adapter("cats", str(tmp_path / "adapter"))
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts + prompts, params, adapter=["cats", "cats", None, None])
    got = [o.outputs[0].token_ids for o in outs]
    assert got[:2] == adapter_tokens
    assert got[2:] == base_tokens
    llm.close()
