"""A draft's vocabulary against the target's: the start-up check, and fitting a padded draft to the target.

Families pad their embedding tables to different multiples per model size while sharing one tokenizer
(Qwen2.5-0.5B/1.5B/3B have 151,936 rows, Qwen2.5-7B and up 152,064, all for the same 151,665 tokens).
The rows past the tokenizer are padding, so such a draft proposes for the target exactly as one of
the same size would: its logits are cut or padded (with -inf, never proposed) to the target's width,
and an id it has no row for (a padding id the target sampled) is looked up in its last row; that only
shapes the draft's later proposals, which the target verifies. A GGUF's tokenizer also names those
padding rows ("[PAD<id>]", model/gguf.py); they are left out of the comparison. Tokenizers that map any
token to another id, or a tokenizer with more ids than either model has rows, are refused.
"""

from __future__ import annotations

from typing import Any, Optional

from agentserve.model.arch_config import ArchConfig, ModelLoadError
from agentserve.model.gguf import without_gguf_padding
from agentserve.model.llama import CausalLM


def check_draft_vocabulary(target: ArchConfig, draft: ArchConfig, target_tokenizer: Optional[Any],
                           draft_tokenizer: Optional[Any]) -> None:
    """Start-up check: the draft must score the target's token ids (ModelLoadError saying why not)."""
    if target_tokenizer is not None and draft_tokenizer is not None:
        # A GGUF's tokenizer also names its embedding's padding rows: they are no tokens.
        target_vocab = without_gguf_padding(target_tokenizer.get_vocab())
        if target_vocab != without_gguf_padding(draft_tokenizer.get_vocab()):
            raise ModelLoadError("the draft model's tokenizer maps tokens to other ids than the target's: "
                                 "speculative decoding needs a draft with the target's vocabulary")
        num_ids = max(target_vocab.values()) + 1
        for who, arch in (("draft", draft), ("target", target)):
            if arch.vocab_size < num_ids:
                raise ModelLoadError(f"the {who} model's embedding has {arch.vocab_size} rows but its tokenizer "
                                     f"uses ids up to {num_ids - 1}: the checkpoint does not fit its tokenizer")
        return
    if target.vocab_size != draft.vocab_size:
        # Without tokenizers (dummy weights) only equal sizes are known to be the same vocabulary.
        raise ModelLoadError(f"the draft model's vocabulary has {draft.vocab_size} entries and the target's "
                             f"{target.vocab_size}, and there is no tokenizer to show that they share their ids: "
                             "speculative decoding needs a draft with the target's vocabulary")


def fit_draft_vocabulary(model: CausalLM, target_vocab_size: int) -> None:
    """Makes a draft whose table is padded to another size score the target's ids: logits as wide as the
    target's, and ids past its own rows looked up in its last row."""
    draft_rows = model.cfg.vocab_size
    if draft_rows == target_vocab_size:
        return
    model.lm_head.num_logits = target_vocab_size
    if draft_rows < target_vocab_size:
        model.embed_tokens.max_id = draft_rows - 1
