"""Where a loaded adapter's weights came from, and whether its directory still holds those files.

The manager reads an adapter again from its directory when its weights have left memory (the CPU
tier's LRU eviction, or a drained unload whose requests or sessions still run). Those requests run
under the key of the weights read at load, and prefix-cache pages and session KV computed under them
carry that key. If the directory has been overwritten since (a trainer saving its next checkpoint
into the same output_dir, a new version copied over the old), serving what it holds now under the
old key would mix the new weights with KV of the old ones: outputs of neither adapter. So each load
records the identity of the files it read, and a read again refuses files that are no longer those:
the requests of that key fail with the reason, and loading the name again gives the new weights a
new key.

A file's identity is its device, inode, size and modification time: copying or saving a file over
it changes the inode or the mtime, while reading it changes neither.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from agentserve.lora.adapter import BIN_FILE, SAFETENSORS_FILE
from agentserve.lora.peft_config import CONFIG_FILE, LoRAAdapterError

# Every file the loader may read (lora/adapter.py): a weights file appearing or vanishing counts too.
ADAPTER_FILES = (CONFIG_FILE, SAFETENSORS_FILE, BIN_FILE)

# (device, inode, size, mtime in ns) of one file; None where the file is absent.
FileIdentity = Optional[tuple[int, int, int, int]]


def _identity(path: Path) -> FileIdentity:
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # absent, unreadable or not a path the OS takes (NUL): the loader says which
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class AdapterSource:
    """An adapter directory and the identity of its files when they were read."""

    path: Path
    files: tuple[FileIdentity, ...]  # one per ADAPTER_FILES entry

    @classmethod
    def of(cls, path: Path) -> "AdapterSource":
        """The directory's files as they are now (taken before reading them: a change made while
        they are read then shows as a change later, never the other way round)."""
        return cls(path, tuple(_identity(path / name) for name in ADAPTER_FILES))

    def check_unchanged(self, name: str) -> None:
        """Raises LoRAAdapterError naming the files when the directory no longer holds the files
        read at load. A missing directory is left to the reader, whose error says so."""
        if _identity(self.path) is None:
            return
        now = AdapterSource.of(self.path)
        changed = [file for file, then, current in zip(ADAPTER_FILES, self.files, now.files) if then != current]
        if changed:
            raise LoRAAdapterError(
                f"LoRA adapter {name!r}: {', '.join(changed)} in {self.path} changed since it was loaded, so its "
                "weights are not the ones its requests and cached pages were computed with; load the adapter "
                "again to serve the new files (they get a new cache key)")
