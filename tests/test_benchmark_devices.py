"""The benchmarks' device, dtype and shape options on the CPU: parsing, clear errors, the generate benchmark's
memory table. (No timing is asserted; the GPU runs are scripts/gpu_check.sh.)"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from smartfed.benchmark.hardware import SHAPES, llama_config, parse_device, parse_dtype, peak_during

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}_devices", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["round", "more_layer", "generate"])
def bench(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    module = _load(request.param)
    try:
        yield module
    finally:
        sys.modules.pop(module.__name__, None)


def test_defaults_are_the_cpu_in_float32(bench: ModuleType) -> None:
    args = bench.parse_args([])
    assert (args.device, args.dtype) == ("cpu", "float32")


@no_cuda
def test_cuda_without_cuda_is_refused_before_any_work(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        bench.parse_args(["--device", "cuda", "--dtype", "bfloat16"])
    assert info.value.code == 2
    assert "--device 'cuda': CUDA is not available here" in capsys.readouterr().err


def test_shapes_and_layers() -> None:
    llama = SHAPES["llama2-7b"]
    config = llama_config(llama, 2)
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads) == (4096, 11008, 32)
    assert config.num_hidden_layers == 2 and config.vocab_size == 32000 and not config.tie_word_embeddings
    assert "hidden 576, intermediate 1536, layers 30, heads 9, kv heads 3" in SHAPES["smollm2"].describe(30)
    round_bench = _load("round")
    try:
        assert round_bench.parse_args(["--shape", "llama2-7b"]).layers == 2  # a few of its 32 layers
        assert round_bench.parse_args([]).layers == 30  # SmolLM2-135M whole, as before
    finally:
        sys.modules.pop(round_bench.__name__, None)


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "mps"])
def test_bad_devices_are_named(spec: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"--device {spec!r}")):
        parse_device(spec)


def test_dtypes() -> None:
    assert parse_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match="--dtype 'int8'"):
        parse_dtype("int8", torch.device("cpu"))


def test_cpu_peak_is_the_rss_growth_of_the_call() -> None:
    def grow() -> None:
        block = bytearray(256 << 20)  # touched: resident
        block[::4096] = b"\x01" * len(block[::4096])
        time.sleep(0.1)  # the sampler needs the GIL, which torch's kernels release and this slice assignment holds

    assert peak_during(grow, torch.device("cpu")) >= 128 << 20  # sampled every 5 ms: most of it is seen


def test_generate_prints_time_and_memory_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load("generate")
    try:
        argv = ["--layers", "1", "--new_tokens", "2", "--prompt_len", "4", "--repeats", "1", "--batches", "1"]
        assert bench.main([*argv, "--dtype", "bfloat16"]) == 0
    finally:
        sys.modules.pop(bench.__name__, None)
    out = capsys.readouterr().out
    assert "SmolLM2-135M shapes, 1 layers" in out and "bfloat16" in out
    assert re.search(r"^\s+1 \|.*\|\s+\d+\.\d\d (PASS|MISS) \|", out, re.M), out
    assert "memory, MiB: weights held by each variant" in out
    weights = out.splitlines()[out.splitlines().index(next(x for x in out.splitlines() if x.startswith("weights"))) + 1]
    assert re.fullmatch(r"\s+\|\s+[\d.]+\s+[\d.]+\s+[\d.]+ \|\s+1\.0\d\d", weights), weights  # routed ≈ merged
