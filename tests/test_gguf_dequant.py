"""GGUF dequantization with torch (agentserve/model/gguf_dequant.py), the GPU's path at load, against
the gguf library's numpy dequantizers, the reference it ports: every ported type gives the same fp32
bits (NaN where the reference has NaN) for random blocks, whatever the chunking; a type not ported is
left to the library. On a GPU (`pytest -m gpu`) the same on the device, and a whole GGUF file's tensors
dequantized on the GPU equal the CPU's."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch


gguf = pytest.importorskip("gguf")

from agentserve.model import gguf_dequant  # noqa: E402
from agentserve.model.gguf import gguf_tensors  # noqa: E402

T = gguf.GGMLQuantizationType
PORTED = sorted(gguf_dequant.TORCH_DEQUANTIZED_TYPES, key=lambda t: t.value)


def _random_tensor(qtype: gguf.GGMLQuantizationType, rows: int, cols: int, seed: int) -> np.ndarray:
    """A (rows, bytes per row) tensor of random blocks, as GGUFFile hands out a quantized tensor."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(rows, cols // block_size * type_size), dtype=np.uint8)


def _assert_same_bits(ref: np.ndarray, got: torch.Tensor) -> None:
    expected = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32).reshape(-1))
    got = got.cpu()
    assert got.dtype == torch.float32 and got.shape == expected.shape
    nan = expected.isnan()
    assert torch.equal(nan, got.isnan())
    assert int((~nan).sum()) > expected.numel() // 2  # random fp16 scales are mostly finite
    assert torch.equal(expected[~nan].view(torch.int32), got[~nan].view(torch.int32))


def _reference(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN scales in random blocks
        return gguf.quants.dequantize(data, qtype)


def _check(qtype: gguf.GGMLQuantizationType, device: torch.device, rows: int, cols: int, seed: int) -> None:
    data = _random_tensor(qtype, rows, cols, seed)
    got = gguf_dequant.dequantize_on(data, qtype, device)
    assert got is not None and got.device.type == device.type
    _assert_same_bits(_reference(data, qtype), got)


@pytest.mark.parametrize("qtype", PORTED, ids=lambda t: t.name)
def test_every_ported_type_gives_the_gguf_librarys_bits(qtype: gguf.GGMLQuantizationType) -> None:
    for seed, (rows, cols) in enumerate([(1, 256), (3, 512), (17, 768)]):
        _check(qtype, torch.device("cpu"), rows, cols, seed)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_0, T.Q8_0, T.IQ2_XS], ids=lambda t: t.name)
def test_chunk_boundaries_do_not_change_the_values(qtype: gguf.GGMLQuantizationType,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_dequant, "_BLOCKS_PER_CHUNK", 3)  # 7 rows of 2-8 blocks: chunks straddle rows
    _check(qtype, torch.device("cpu"), 7, 512, seed=11)


def test_a_type_not_ported_is_left_to_the_gguf_library() -> None:
    data = _random_tensor(T.TQ2_0, 2, 256, seed=3)
    assert T.TQ2_0 not in gguf_dequant.TORCH_DEQUANTIZED_TYPES
    assert gguf_dequant.dequantize_on(data, T.TQ2_0, torch.device("cpu")) is None


def test_f32_tensors_are_copied_not_views_of_the_file() -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    values.setflags(write=False)  # as a memory-mapped file's tensor
    got = gguf_dequant.dequantize_on(values, T.F32, torch.device("cpu"))
    assert got is not None and torch.equal(got, torch.arange(12, dtype=torch.float32))
    got[0] = 5.0  # writable, and the source is untouched
    assert values[0, 0] == 0.0


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("qtype", PORTED, ids=lambda t: t.name)
def test_every_ported_type_gives_the_same_bits_on_the_gpu(qtype: gguf.GGMLQuantizationType) -> None:
    _check(qtype, torch.device("cuda"), 4096, 4096, seed=qtype.value)


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("source", ["smollm2", "tiny_q5_0"])
def test_a_files_tensors_dequantized_on_the_gpu_equal_the_cpus(source: str, tmp_path: Path,
                                                               request: pytest.FixtureRequest) -> None:
    if source == "smollm2":
        file = request.getfixturevalue("smollm2_gguf")  # Q4_1 / Q8_0 tensors, llama's permuted q / k rows
    else:
        from agentserve.testing import tiny_model_cached
        from helpers.gguf_checkpoints import write_gguf

        file = write_gguf(tiny_model_cached("llama"), tmp_path / "m.gguf", "llama", qtype="Q5_0")
    cpu = list(gguf_tensors(file, torch.device("cpu")))
    gpu = list(gguf_tensors(file, torch.device("cuda")))
    assert [(n, f) for n, _, f in cpu] == [(n, f) for n, _, f in gpu]
    for (name, a, _), (_, b, _) in zip(cpu, gpu):
        assert b.device.type == "cuda" and a.shape == b.shape, name
        assert torch.equal(a, b.cpu()), name



@pytest.mark.gpu
@NEEDS_CUDA
def test_a_quantized_gguf_served_on_the_gpu_gives_the_dequantized_checkpoints_tokens(tmp_path: Path) -> None:
    """The engine end to end on the GPU: a Q8_0 GGUF (unpacked on the device) and a Hugging Face copy of the
    weights those blocks dequantize to (by the gguf library) decode the same greedy tokens."""
    from agentserve import SamplingParams
    from agentserve.llm import LLM
    from agentserve.testing import tiny_model_cached
    from helpers.gguf_checkpoints import dequantized_copy, write_gguf

    src = tiny_model_cached("llama")
    file = write_gguf(src, tmp_path / "m.gguf", "llama", qtype="Q8_0")
    reference = dequantized_copy(src, tmp_path / "ref", "Q8_0")
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = ["The quick brown fox", "1, 2, 3,", "Hello"]
    with LLM(str(file), tokenizer=str(src), num_blocks=64, dtype="bfloat16") as from_gguf:
        got = [o.outputs[0].token_ids for o in from_gguf.generate(prompts, greedy)]
    with LLM(str(reference), num_blocks=64, dtype="bfloat16") as ref:
        want = [o.outputs[0].token_ids for o in ref.generate(prompts, greedy)]
    assert got == want and all(len(t) == 12 for t in got)
