"""Which file a GGUF `--model` names (a .gguf file, a directory holding one model, the first shard of a split
one), without reading it: the CLI checks its flags with this before anything heavy is imported (model/gguf.py
reads the file itself).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from agentserve.errors import ModelLoadError

# gguf-split's shard names (llama.cpp's LLAMA_SPLIT_PATH format).
SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


def _is_one_split_model(files: list[Path]) -> bool:
    """Whether `files` (sorted) are exactly the shards 1..N of one gguf-split model."""
    matches = [SHARD_NAME.match(f.name) for f in files]
    if not all(matches):
        return False
    keys = {(m["prefix"], m["count"]) for m in matches if m is not None}
    indices = [int(m["index"]) for m in matches if m is not None]
    return len(keys) == 1 and indices == list(range(1, len(files) + 1)) and int(next(iter(keys))[1]) == len(files)


def find_gguf_file(path: Path) -> Optional[Path]:
    """The GGUF file `path` names: the file itself, or the single .gguf (or the first shard of the
    one split model) in a directory without a config.json (a Hugging Face directory with a
    config.json is read as safetensors)."""
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf checkpoint")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1 and not _is_one_split_model(files):
        raise ModelLoadError(f"{path} holds several GGUF files ({', '.join(f.name for f in files)}); "
                             "pass the one to serve as --model")
    return files[0] if files else None
