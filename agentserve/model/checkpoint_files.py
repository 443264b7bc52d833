"""The weight files of a Hugging Face model directory and the tensors in them: safetensors (single or
sharded with model.safetensors.index.json) or, as vLLM falls back to when a directory has no
safetensors, PyTorch pickles (pytorch_model.bin, or shards named by pytorch_model.bin.index.json).

Pickles are read with torch.load(weights_only=True): tensors and plain containers only, so a file
cannot run code at load (a pickle that needs more is refused, naming the file)."""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open

from agentserve.json_file import read_json_object
from agentserve.model.arch_config import ModelLoadError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# .bin files a training run leaves next to the weights (vLLM's filter_files_not_needed_for_inference).
_NOT_WEIGHT_FILES = ("training_args.bin", "optimizer.bin", "scheduler.bin", "scaler.bin", "rng_state.bin")
# Mistral's own layout (consolidated.safetensors, params.json), shipped beside the Hugging Face files in
# mistralai's repositories; vLLM's "hf" format skips it as well.
MISTRAL_CONSOLIDATED_PREFIX = "consolidated"
# load_format values that may fall back to .bin files (vLLM's "auto"); "safetensors" reads only those.
BIN_FALLBACK_FORMATS = ("auto",)


def _indexed_files(path: Path, index_name: str) -> list[Path]:
    """The shard files an index's weight_map names, each checked to exist."""
    index = path / index_name
    weight_map = read_json_object(index, ModelLoadError, "").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index} has no weight_map naming the shards of each tensor")
    files = sorted({path / str(f) for f in weight_map.values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{path}: shards named in {index_name} are missing: {missing}")
    return files


def _bin_files(path: Path) -> list[Path]:
    if (path / BIN_INDEX).is_file():
        return _indexed_files(path, BIN_INDEX)
    return sorted(f for f in path.glob("*.bin") if f.name not in _NOT_WEIGHT_FILES)


def weight_files(path: Path, load_format: str) -> list[Path]:
    """The checkpoint's weight files: its safetensors if it has any, else (load_format 'auto') its .bin files."""
    if (path / SAFETENSORS_INDEX).is_file():
        return _indexed_files(path, SAFETENSORS_INDEX)
    files = sorted(path.glob("*.safetensors"))
    hf_files = [f for f in files if not f.name.startswith(MISTRAL_CONSOLIDATED_PREFIX)]
    if hf_files:
        return hf_files  # Mistral's repositories ship both layouts: the consolidated copy is the same weights
    if files:
        raise ModelLoadError(f"{path} holds only {', '.join(f.name for f in files)}, Mistral's own checkpoint layout "
                             "(tensor names like layers.0.attention.wq.weight), which is not read here: use the "
                             "Hugging Face layout of the model (model*.safetensors with a config.json)")
    bin_files = _bin_files(path)
    if bin_files and load_format in BIN_FALLBACK_FORMATS:
        return bin_files
    if bin_files:
        raise ModelLoadError(f"{path} has no *.safetensors weights but holds {', '.join(f.name for f in bin_files)}: "
                             f"load_format={load_format!r} reads safetensors only; use load_format 'auto' to read "
                             "the .bin files")
    gguf_files = sorted(f.name for f in path.glob("*.gguf"))
    if gguf_files:  # a directory with a config.json is read as Hugging Face (model/gguf.py)
        raise ModelLoadError(f"{path} has no *.safetensors weights but holds {', '.join(gguf_files)}: pass the "
                             ".gguf file itself as the model (a directory with a config.json is read as a "
                             "Hugging Face checkpoint)")
    raise ModelLoadError(f"{path} has no weights: a Hugging Face directory needs *.safetensors (or pytorch_model*.bin) "
                         "files; a GGUF checkpoint is passed as its .gguf file")


@contextlib.contextmanager
def open_safetensors(file: Path) -> Iterator[Any]:
    """safe_open, its errors (a damaged header, a truncated or empty file) as ModelLoadError naming the file."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as e:
        raise ModelLoadError(f"{file} is not a valid safetensors file ({e}); download it again") from None


def load_bin_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """A .bin checkpoint file's tensors, by name; ModelLoadError naming the file for anything else."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # a refused pickle, a bad zip, a truncation
        raise ModelLoadError(f"{file} could not be read as a PyTorch state dict with torch.load(weights_only=True) "
                             f"({e}); download it again or convert it to safetensors") from None
    if not isinstance(state, dict):
        raise ModelLoadError(f"{file} holds a {type(state).__name__}, not a state dict of named tensors")
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ModelLoadError(f"{file} holds entries that are not tensors: {', '.join(not_tensors[:3])}")
    return state


def file_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of one weight file."""
    if file.suffix == ".safetensors":
        with open_safetensors(file) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)
    else:
        yield from load_bin_state_dict(file).items()


def file_tensor_names(file: Path) -> list[str]:
    """The tensor names of one weight file (a safetensors header is read without the tensor data)."""
    if file.suffix == ".safetensors":
        with open_safetensors(file) as f:
            return list(f.keys())
    return list(load_bin_state_dict(file))
