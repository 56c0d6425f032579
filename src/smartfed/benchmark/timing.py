"""Helpers shared by the benchmark scripts: how noisy a timing was and what else ran meanwhile."""

from __future__ import annotations

import os
import platform
import statistics

import torch


def spread(samples: list[float]) -> float:
    """Interquartile range over median: how much the machine moved under the timings."""
    if len(samples) < 4:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return (q3 - q1) / statistics.median(samples)


def cpu_jiffies() -> tuple[int, int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat, and this process's own; None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    own = os.times()
    return sum(ticks) - idle, sum(ticks), round((own.user + own.system) * os.sysconf("SC_CLK_TCK"))


def others_share(before: tuple[int, int, int] | None, after: tuple[int, int, int] | None) -> float | None:
    """Fraction of all CPU time between the two readings that went to other processes."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    busy, total, own = (a - b for a, b in zip(after, before, strict=True))
    return min(max((busy - own) / total, 0.0), 1.0)


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                name = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return f"{device.type}: {name} | torch {torch.__version__} | threads {torch.get_num_threads()}"
