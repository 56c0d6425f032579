"""What the benchmark scripts share about where they run: device and dtype options, model shapes, memory.

The scripts under ``benchmarks/`` take ``--device``, ``--dtype`` and (the model-level ones)
``--shape``; this module parses those options with clear errors, holds the shapes of the
real models they imitate with random weights, and measures memory the same way for all:
on CUDA the caching allocator's peak (``torch.cuda.max_memory_allocated``), on CPU the
resident set size (RSS) of the process, or of a whole process tree (a Flower simulation:
its Ray workers are child processes).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelShape:
    """A real model's architecture, built with random weights (nothing is downloaded)."""

    label: str
    llama: dict[str, Any]  # LlamaConfig keyword arguments
    default_layers: int  # what a benchmark builds by default (the real model, or a few layers of it)

    def describe(self, layers: int) -> str:
        c = self.llama
        tied = "tied embeddings" if c["tie_word_embeddings"] else "untied embeddings"
        return (
            f"hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, layers {layers}, heads "
            f"{c['num_attention_heads']}, kv heads {c['num_key_value_heads']}, vocab {c['vocab_size']}, {tied}"
        )


# HuggingFaceTB/SmolLM2-135M's config.json: the model of the project's benchmarks, all 30 layers by default.
SMOLLM2_135M = ModelShape(
    "SmolLM2-135M",
    {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
    },
    default_layers=30,
)
# meta-llama/Llama-2-7b-hf's config.json. A layer holds 202 M parameters (404 MB in bf16), so the
# benchmarks build 2 of its 32 layers by default: each layer's matmuls are those of the real model,
# and per-layer costs (what MoRE adds per matrix) scale to 32 layers.
LLAMA2_7B = ModelShape(
    "Llama-2-7B",
    {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
    },
    default_layers=2,
)
SHAPES: dict[str, ModelShape] = {"smollm2": SMOLLM2_135M, "llama2-7b": LLAMA2_7B}


def llama_config(shape: ModelShape, layers: int, **overrides: Any):  # -> transformers.LlamaConfig
    """A LlamaConfig of ``shape`` with ``layers`` decoder layers (token ids 0/1/2 for pad/bos/eos unless overridden)."""
    from transformers import LlamaConfig

    values = {**shape.llama, "num_hidden_layers": layers, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    values.update(overrides)
    return LlamaConfig(**values)


def parse_device(spec: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, checked against this machine (ValueError says what is wrong)."""
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"--device {spec!r}: not a device (expected cpu, cuda or cuda:N)") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {spec!r}: the benchmarks run on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = torch.version.cuda or "none (a CPU-only build)"
            raise ValueError(f"--device {spec!r}: CUDA is not available here (torch {torch.__version__}, CUDA {build})")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)  # an explicit index: memory statistics and synchronize need one
    return device


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    """A name of ``DTYPES``, checked against ``device`` (bfloat16 needs an Ampere or newer GPU)."""
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected one of {sorted(DTYPES)}")
    dtype = DTYPES[name]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a wall-clock timing covers them (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- memory --------------------------------------------------------------------------------------------
def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of one process (this one by default), from /proc or psutil; 0 if unknown."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:  # psutil missing, or the process is gone
        return 0


def pss_bytes(pid: int) -> int | None:
    """Proportional set size (shared pages split among the processes mapping them); None off Linux."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def max_rss_bytes() -> int:
    """This process's peak RSS since it started (getrusage; Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), from psutil or /proc."""
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        pass
    except Exception:  # the process is gone
        return []
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ')'
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class TreeMemory:
    """One reading of a process tree: summed RSS, summed PSS (None when unreadable) and how many processes."""

    rss: int
    pss: int | None
    processes: int


def tree_memory(root: int) -> TreeMemory:
    """RSS and PSS of ``root`` and all its descendants. RSS counts pages shared between the processes
    (torch's libraries in every Ray worker) once per process, PSS splits them: the sum of PSS is what
    the tree really holds, the sum of RSS an upper bound."""
    pids = [root, *descendants(root)]
    rss, pss, seen = 0, 0, 0
    pss_known = True
    for pid in pids:
        r = rss_bytes(pid)
        if r == 0:  # exited between listing and reading
            continue
        seen += 1
        rss += r
        p = pss_bytes(pid)
        if p is None:
            pss_known = False
        else:
            pss += p
    return TreeMemory(rss, pss if pss_known else None, seen)


class PeakSampler:
    """Reads ``probe()`` every ``interval`` seconds in a background thread and keeps the largest value.

    ``with PeakSampler(lambda: rss_bytes()) as s: work()`` then ``s.peak``. The thread only reads /proc
    (cheap, and it releases the GIL while waiting), so it barely slows the work it watches.
    """

    def __init__(self, probe: Callable[[], int], interval: float = 0.005) -> None:
        self.probe, self.interval = probe, interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self._read()
            if self._stop.wait(self.interval):
                return

    def _read(self) -> None:
        value = self.probe()
        self.samples += 1
        self.peak = max(self.peak, value)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._read()  # one last reading after the work


_cuda_peaks: dict[int, int] = {}  # device index -> the largest max_memory_allocated seen before a reset


def _note_cuda_peak(device: torch.device) -> None:
    index = device.index or 0
    _cuda_peaks[index] = max(_cuda_peaks.get(index, 0), torch.cuda.max_memory_allocated(device))


def peak_during(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory of one call of ``fn`` above what was in use before it, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, the allocator's cache left out). CPU: the
    process's RSS, sampled every 5 ms, minus its RSS before (a lower bound: memory the allocator kept
    from an earlier call is reused without growing the RSS)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        _note_cuda_peak(device)  # the reset below would lose the process's peak so far
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = rss_bytes()
    with PeakSampler(rss_bytes) as sampler:
        fn()
    return max(sampler.peak - before, 0)


def process_peak_line(device: torch.device) -> str:
    """The whole process's peak memory so far: what the device had to hold for every variant at once."""
    if device.type == "cuda":
        _note_cuda_peak(device)
        allocated = _cuda_peaks[device.index or 0] / 2**30
        reserved = torch.cuda.max_memory_reserved(device) / 2**30
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        return (
            f"process peak: {allocated:.2f} GiB allocated by tensors, {reserved:.2f} GiB reserved by the caching "
            f"allocator (since its last reset), of {total:.1f} GiB on the device (every variant resident at once)"
        )
    return f"process peak RSS: {max_rss_bytes() / 2**30:.2f} GiB (every variant resident at once)"
