"""agentserve's GGUF reader (agentserve/model/gguf_reader.py) against the gguf library's GGUFReader, the
reference it replaces: every metadata key with the same value (string arrays decoded on demand), every
tensor with the same type, shape, dtype and bytes; for files written here the way llama.cpp's converter
writes them (with and without a tokenizer, quantized and float tensors, split shards, big-endian). A file
that is not GGUF, of an unknown version or cut short is a ValueError naming what is wrong, and a
ModelLoadError naming the file when it is served."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agentserve.llm import LLM
from agentserve.model.arch_config import ModelLoadError
from agentserve.model.gguf_reader import GGUFFile
from agentserve.testing import tiny_model_cached
from helpers.gguf_checkpoints import write_gguf

gguf = pytest.importorskip("gguf")


def _assert_same_as_gguf_reader(path: Path) -> None:
    ref = gguf.GGUFReader(str(path))
    mine = GGUFFile(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]  # GGUFReader's header pseudo-fields
    assert keys and sorted(mine.keys()) == sorted(keys) and all(mine.has(k) for k in keys)
    for key in keys:
        want, got = ref.fields[key].contents(), mine.value(key)
        if isinstance(want, float) or (isinstance(want, list) and want and isinstance(want[0], float)):
            np.testing.assert_allclose(got, want, rtol=1e-7, err_msg=key)  # f32 read as the same double
        else:
            assert got == want, key
    assert [t.name for t in mine.tensors] == [t.name for t in ref.tensors]
    for r, m in zip(ref.tensors, mine.tensors):
        assert m.tensor_type == r.tensor_type and m.shape == tuple(int(d) for d in r.shape), r.name
        assert m.data.shape == r.data.shape and m.data.dtype == r.data.dtype, r.name
        assert np.array_equal(m.data, r.data), r.name
    assert not mine.has("no.such.key") and mine.value("no.such.key", 7) == 7


@pytest.mark.parametrize("arch,qtype,pre", [("llama", None, None), ("qwen2", "Q8_0", "qwen2"),
                                            ("qwen3", "Q4_0", "qwen2"), ("llama", "BF16", "llama-bpe"),
                                            ("qwen2", "F16", None)])
def test_files_read_as_gguf_reader_reads_them(arch: str, qtype: Any, pre: Any, tmp_path: Path) -> None:
    file = write_gguf(tiny_model_cached(arch), tmp_path / "m.gguf", arch, qtype=qtype, tokenizer_pre=pre)
    _assert_same_as_gguf_reader(file)
    if pre is not None:  # the vocabulary itself, decoded from the skipped-over string array
        tokens = GGUFFile(file).value("tokenizer.ggml.tokens")
        assert isinstance(tokens, list) and len(tokens) > 100 and all(isinstance(t, str) for t in tokens)


def test_split_shards_and_a_big_endian_file(tmp_path: Path) -> None:
    (tmp_path / "split").mkdir()
    first = write_gguf(tiny_model_cached("qwen2"), tmp_path / "split" / "m.gguf", "qwen2", tokenizer_pre="qwen2",
                       split_max_tensors=9)
    shards = sorted(first.parent.iterdir())
    assert len(shards) >= 2
    for shard in shards:
        _assert_same_as_gguf_reader(shard)
    big = tmp_path / "big.gguf"
    writer = gguf.GGUFWriter(str(big), "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_uint32("llama.block_count", 3)
    writer.add_float32("llama.rope.freq_base", 500000.0)
    writer.add_bool("general.flag", True)
    writer.add_string("general.name", "héllo")
    writer.add_array("general.words", ["a", "bb", "ccc"])
    writer.add_array("general.numbers", [1.5, -2.25])
    writer.add_tensor("w32", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("w16", np.linspace(-1, 1, 8, dtype=np.float16).reshape(2, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _assert_same_as_gguf_reader(big)
    mine = GGUFFile(big)
    assert mine.value("llama.block_count") == 3 and mine.value("general.words") == ["a", "bb", "ccc"]
    assert mine.tensors[0].data.astype(np.float32).tolist() == np.arange(12).reshape(3, 4).tolist()


def test_broken_files_are_named(tmp_path: Path) -> None:
    src = tiny_model_cached("llama")
    good = write_gguf(src, tmp_path / "good.gguf", "llama", tokenizer_pre="llama-bpe").read_bytes()
    cases = {"empty": (b"", "empty"), "magic": (b"GGML" + good[4:], "not a GGUF file"),
             "version": (good[:4] + (1).to_bytes(4, "little") + good[8:], "GGUF version 1 is not supported"),
             "header": (good[:20], "ends inside its header or metadata"),
             "vocabulary": (good[:len(good) // 40], "ends inside"),
             "tensor data": (good[:-64], "runs past the end of the file")}
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.gguf"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message):
            GGUFFile(path)
    with pytest.raises(ModelLoadError, match=r"cannot read GGUF file .*tensor_data\.gguf: tensor .* runs past the end"):
        LLM(str(tmp_path / "tensor_data.gguf"), num_blocks=16)


def test_corrupted_headers_are_value_errors(tmp_path: Path) -> None:
    """Random bytes written over a small file's header, metadata and tensor table (counts, lengths, types,
    dimension counts): each read either succeeds or is a ValueError, never another exception, a hang or
    an allocation sized by a corrupted count."""
    good = write_gguf(tiny_model_cached("llama"), tmp_path / "good.gguf", "llama", tokenizer_pre="llama-bpe")
    data = good.read_bytes()
    header_end = data.index(b"output_norm.weight") + 200  # past the metadata, into the tensor table
    rng = np.random.default_rng(0)
    outcomes = {"read": 0, "refused": 0}
    for trial in range(300):
        broken = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(4, header_end))
            broken[at:at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        path = tmp_path / f"broken{trial % 4}.gguf"
        path.write_bytes(bytes(broken))
        try:
            read = GGUFFile(path)
            for key in read.keys():  # every value decodes (arrays are decoded only when asked for)
                read.value(key)
            outcomes["read"] += 1
        except ValueError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 50 and sum(outcomes.values()) == 300
