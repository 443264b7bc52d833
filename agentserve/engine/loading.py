"""What an engine is built from: the model's shape and directory, its tokenizer and EOS ids, the
context length it serves, and whether it schedules asynchronously."""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch

from agentserve.config import EngineConfig
from agentserve.engine.generation_defaults import generation_config_dir
from agentserve.json_file import read_json_object
from agentserve.model.arch_config import ArchConfig, ModelLoadError
from agentserve.model.gguf import gguf_config_dict, gguf_has_tokenizer
from agentserve.model.gguf_files import find_gguf_file
from agentserve.model.rope_scaling import scaled_max_positions

logger = logging.getLogger(__name__)


def resolve_model(config: EngineConfig, model: Optional[str] = None) -> tuple[ArchConfig, Optional[Path]]:
    """The model's shape and directory (`model`: another one than config.model.model, the draft);
    with load_format=dummy the model may be a named shape; a GGUF file (or a directory holding one)
    is read from its metadata."""
    name = model if model is not None else config.model.model
    path = Path(name).expanduser()
    gguf_file = find_gguf_file(path)
    if gguf_file is not None:
        return ArchConfig.from_dict(gguf_config_dict(gguf_file)), gguf_file
    if path.is_dir():
        if not (path / "config.json").is_file():
            # Neither format: say both, not only the Hugging Face one (a GGUF user expects a .gguf here).
            raise ModelLoadError(f"model directory {name!r} (--model) holds neither a config.json (a Hugging Face "
                                 "model directory) nor a .gguf file: give --model a model directory or a .gguf file")
        return ArchConfig.from_dir(path), path
    if config.model.load_format == "dummy":
        from agentserve.testing.tiny import NAMED_SHAPES

        if name in NAMED_SHAPES:
            return ArchConfig.from_dict(NAMED_SHAPES[name]), None
        raise ModelLoadError(f"unknown model shape {name!r}; named shapes: {', '.join(NAMED_SHAPES)}")
    raise ModelLoadError(f"model path {name!r} does not exist or is not a directory "
                         "(agentserve loads local Hugging Face model directories and GGUF files; there is no hub download)")


def resolve_draft_model(config: EngineConfig, arch: ArchConfig, tokenizer: Any
                        ) -> Optional[tuple[ArchConfig, Optional[Path]]]:
    """The draft model's shape and directory when speculating with one; refuses a draft whose
    vocabulary is not the target's."""
    if config.spec.method != "draft_model" or config.spec.draft_model is None:
        return None
    from agentserve.spec.draft_vocab import check_draft_vocabulary

    try:
        draft_arch, draft_path = resolve_model(config, config.spec.draft_model)
        check_draft_vocabulary(arch, draft_arch, tokenizer, load_tokenizer(draft_path) if tokenizer is not None else None)
    except ModelLoadError as e:
        # The same loaders serve the target: say that it is the draft (--draft-model) that is wrong.
        raise ModelLoadError(f"draft_model {config.spec.draft_model!r} (--draft-model): {e}") from None
    return draft_arch, draft_path


def resolve_async_scheduling(config: EngineConfig, device: torch.device) -> bool:
    """On by default where it pays (CUDA: the host prepares step N+1 while the device runs N). The
    environment variable AGENTSERVE_ASYNC_SCHEDULING=0/1 overrides the default (tests use it to run
    the CPU suite both ways); an explicit config value wins over both."""
    if config.scheduler.async_scheduling is not None:
        return config.scheduler.async_scheduling
    env = os.environ.get("AGENTSERVE_ASYNC_SCHEDULING")
    if env is not None and env != "":
        return env not in ("0", "false", "False")
    return device.type == "cuda"


def load_model_tokenizer(config: EngineConfig, model_path: Optional[Path]) -> Any:
    """The tokenizer the engine serves with: --tokenizer's when given (then it must exist and hold one:
    a typo must not silently serve token ids only), else the model's own (which may have none)."""
    if config.model.tokenizer is None:
        return load_tokenizer(model_path)
    given = config.model.tokenizer
    path = Path(given).expanduser()
    if not path.exists():
        raise ModelLoadError(f"tokenizer {given!r} (--tokenizer) does not exist: give a tokenizer directory or a "
                             ".gguf file with tokenizer metadata, or leave --tokenizer out to use the model's")
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise ModelLoadError(f"tokenizer {given!r} (--tokenizer) holds no tokenizer (tokenizer.json, "
                             "tokenizer_config.json, tokenizer.model, or a .gguf file's tokenizer metadata)")
    return tokenizer


def load_tokenizer(path: Optional[Path]) -> Any:
    if path is None:
        return None
    gguf_file = find_gguf_file(path)
    if gguf_file is not None:  # the tokenizer and chat template are in the GGUF metadata
        if not gguf_has_tokenizer(gguf_file):
            logger.warning("%s has no tokenizer metadata: prompts must be token ids and outputs carry no text",
                           gguf_file)
            return None
        return _gguf_tokenizer(gguf_file)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        logger.warning("%s has no tokenizer: prompts must be token ids and outputs carry no text", path)
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - any tokenizer problem is a load error for the user
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {e}") from None


# The GGUF tokenizers built last in this process, by (file, size, mtime): see _gguf_tokenizer.
_GGUF_TOKENIZERS_KEPT = 2
_gguf_tokenizers: OrderedDict[tuple[Path, int, int], Any] = OrderedDict()
_gguf_tokenizers_lock = threading.Lock()


def _gguf_tokenizer(file: Path) -> Any:
    """transformers builds a GGUF's tokenizer by parsing the whole file's metadata with the gguf library
    (~3-8 s on a CPU core for a 49k-token vocabulary, more for Llama 3's 128k), and one process may build
    it again for the same file: a GGUF draft's vocabulary check, an LLM made anew in a notebook, an engine
    per test. The last two are kept (a rewritten file has a new size or mtime, so it is read afresh), and
    each caller gets its own deep copy: a chat_template override on one engine must not reach another."""
    stat = file.stat()
    key = (file.resolve(), stat.st_size, stat.st_mtime_ns)
    with _gguf_tokenizers_lock:
        built = _gguf_tokenizers.get(key)
        if built is not None:
            _gguf_tokenizers.move_to_end(key)
    if built is None:
        from transformers import AutoTokenizer

        try:
            built = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        except Exception as e:  # noqa: BLE001 - any tokenizer problem is a load error for the user
            raise ModelLoadError(f"cannot load the tokenizer from {file}: {e}") from None
        with _gguf_tokenizers_lock:
            _gguf_tokenizers[key] = built
            while len(_gguf_tokenizers) > _GGUF_TOKENIZERS_KEPT:
                _gguf_tokenizers.popitem(last=False)
    return copy.deepcopy(built)


def apply_chat_template_override(tokenizer: Any, template: Optional[str]) -> None:
    """vLLM's --chat-template: a file's contents, or the template itself, replaces the tokenizer's."""
    if template is None:
        return
    if tokenizer is None:
        raise ModelLoadError("chat_template was given, but the model has no tokenizer to apply it with")
    if "{" in template:  # Jinja tags: the template itself
        tokenizer.chat_template = template
        return
    # (A long text is no file name: is_file() would raise on it.)
    if len(template) >= 4096 or not Path(template).is_file():
        raise ModelLoadError(f"chat_template {template!r} is neither a file nor a template (no Jinja tags)")
    tokenizer.chat_template = Path(template).read_text()


def generation_eos(path: Optional[Path], arch: ArchConfig, tokenizer: Any, generation_config: str = "auto"
                   ) -> frozenset[int]:
    """The ids that end an output, as vLLM reads them: the generation config's eos_token_id (the model's for
    --generation-config auto / vllm, the named directory's otherwise), config.json's where there is no
    generation_config.json (transformers' GenerationConfig.from_model_config), and the tokenizer's EOS."""
    eos: list[int] = []
    folder = generation_config_dir(generation_config, path)
    gen_cfg = folder / "generation_config.json" if folder else None
    if gen_cfg is not None and gen_cfg.is_file():
        value = read_json_object(gen_cfg, ModelLoadError, "").get("eos_token_id")
        eos = [value] if isinstance(value, int) else list(value or [])
    else:
        eos = list(arch.eos_token_ids)
    # The tokenizer's own EOS always ends an output (vLLM's request.eos_token_id), listed or not.
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.append(tokenizer.eos_token_id)
    return frozenset(eos)


def decide_max_model_len(config: EngineConfig, arch: ArchConfig) -> int:
    limit = scaled_max_positions(arch.rope_scaling, arch.max_position_embeddings)
    what = "its context length"
    if arch.sliding_window and arch.sliding_window < limit:
        # Attention here is full; past the window it would differ from the model's training.
        limit = arch.sliding_window
        what = "its sliding_window in config.json: sliding-window attention is not implemented, so no sequence may outgrow it"
    wanted = config.model.max_model_len
    if wanted is None:
        return limit
    if wanted > limit:
        raise ModelLoadError(f"max_model_len={wanted} (--max-model-len) exceeds the model's limit of {limit} "
                             f"positions ({what}): give --max-model-len {limit} or less, or leave it out")
    return wanted
