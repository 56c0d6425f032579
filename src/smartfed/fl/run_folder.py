"""The run folder: config.json, metrics.jsonl, per-round router checkpoints, summary.json.

Every file is written to a temporary file in the same folder and renamed into
place, so a crash leaves either the old or the new version, never half a file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..files import sibling_temp_file

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
POOL_FILE = "pool.json"
CHECKPOINTS = "checkpoints"
_CHECKPOINT = re.compile(r"round_(\d+)\.safetensors$")
PAYLOAD_KEY = "smartfed.payload"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_temp_file(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


class RunFolder:
    """Reads and writes one run's folder."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def checkpoint_path(self, server_round: int) -> Path:
        return self.path / CHECKPOINTS / f"round_{server_round:04d}.safetensors"

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.path / CONFIG_FILE, config)

    def read_config(self) -> dict[str, Any]:
        file = self.path / CONFIG_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{self.path} is not a SmartFed run folder (no {CONFIG_FILE})")
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{file}: not valid JSON ({err})") from err

    def read_metrics(self) -> list[dict[str, Any]]:
        file = self.path / METRICS_FILE
        if not file.exists():
            return []
        try:
            return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{file}: not a SmartFed metrics file ({err})") from err

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl whole (it is small), atomically."""
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        atomic_write_bytes(self.path / METRICS_FILE, text.encode())

    def save_checkpoint(self, server_round: int, tensors: dict[str, torch.Tensor], payload: dict[str, Any]) -> Path:
        path = self.checkpoint_path(server_round)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = sibling_temp_file(path)
        try:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                tmp,
                metadata={"format": "pt", PAYLOAD_KEY: json.dumps(payload, sort_keys=True)},
            )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def last_checkpoint(self) -> int:
        """The last round with a checkpoint (0 if none)."""
        folder = self.path / CHECKPOINTS
        rounds = [int(m[1]) for f in folder.glob("round_*.safetensors") if (m := _CHECKPOINT.search(f.name))]
        return max(rounds, default=0)

    def load_checkpoint(self, server_round: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        path = self.checkpoint_path(server_round)
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as fh:
                payload = json.loads((fh.metadata() or {}).get(PAYLOAD_KEY, "{}"))
            return load_file(path), payload
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"checkpoint {path}: cannot read it ({err})") from err

    def write_pool(self, pool: Any) -> None:
        """Record the adapters (source and sha256 of the weights) the routers were trained over."""
        adapters = [
            {"name": a.name, "source": a.source, "path": str(a.path), "sha256": a.sha256, "rank": a.rank}
            for a in (pool.adapters if pool is not None else [])
        ]
        atomic_write_json(self.path / POOL_FILE, {"adapters": adapters})

    def read_pool(self) -> list[dict[str, Any]]:
        file = self.path / POOL_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{self.path}: no {POOL_FILE} (was this run folder written by SmartFed?)")
        return json.loads(file.read_text(encoding="utf-8"))["adapters"]

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / SUMMARY_FILE, summary)
