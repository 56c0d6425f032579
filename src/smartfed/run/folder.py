"""The run folder: config.json, metrics.jsonl, per-round router checkpoints, summary.json.

Every file is written to a temporary file in the same folder and renamed into
place, so a crash leaves either the old or the new version, never half a file.

A run folder holds one run, never two (docs/reliability.md §3): ``RunFolder.open_run``
refuses a fresh run in a non-empty folder (``overwrite`` first removes a previous
SmartFed run, and only that), refuses a resume whose run-defining settings differ from
the folder's config.json, and holds ``.lock`` (an ``flock``) for the run's life, so a
second run or resume on the same folder is refused. Checkpoints carry a sha256 of their
tensors and payload, checked whenever one is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..files import sibling_temp_file

if TYPE_CHECKING:
    from .config import RunConfig

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no advisory locks, runs are not guarded against each other
    fcntl = None  # type: ignore[assignment]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
POOL_FILE = "pool.json"
CHECKPOINTS = "checkpoints"
_CHECKPOINT = re.compile(r"round_(\d+)\.safetensors$")
PAYLOAD_KEY = "smartfed.payload"
CHECKSUM_KEY = "smartfed.sha256"
LOCK_FILE = ".lock"
# Settings a resume may change: they extend the run or change how it is watched, not what it trains.
RESUME_MAY_CHANGE = frozenset(
    {
        "num_rounds",
        "eval_every",
        "output_dir",
        "round_timeout",
        "client_threads",
        "energy",
        # where and on how much hardware the run goes on, not what it trains
        "device",
        "client_gpus",
        "client_cpus",
        "gradient_checkpointing",
    }
)
# What a config.json written before a setting existed ran with. Every run before --dtype loaded its
# base in float32: a resume of such a run keeps float32 (the setting's default, "auto", would give a
# resumed run bfloat16 on a GPU). Settings absent here take their RunConfig default.
LEGACY_SETTINGS: dict[str, Any] = {"dtype": "float32"}
# Keys every SmartFed config.json has and no transformers/PEFT config.json has (see is_run_folder).
_RUN_CONFIG_KEYS = frozenset({"method", "model_name_or_path", "lora_pool", "output_dir"})


class RunFolderBusy(OSError):
    """Another live process holds the run folder's lock."""


def _same_setting(key: str, saved: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether setting ``key`` of a resume (``wanted``) continues the saved run's.

    ``dtype``: "auto" and the dtype it resolves to on the resume's device are one setting
    (a run saved with float32 resumes with the default "auto" on the CPU).
    """
    if saved.get(key) == wanted[key]:
        return True
    if key != "dtype" or key not in saved:
        return False
    from ..models import resolve_device, resolve_dtype

    device = resolve_device(wanted["device"])
    return resolve_dtype(saved[key], device) == resolve_dtype(wanted[key], device)


def tensors_sha256(tensors: dict[str, torch.Tensor], payload_json: str = "") -> str:
    """sha256 over sorted keys, each tensor's dtype, shape and bytes, then the payload's JSON text."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(payload_json.encode())
    return digest.hexdigest()


def is_run_folder(path: str | os.PathLike) -> bool:
    """``path`` holds a config.json written by SmartFed (a run config, not a model's or adapter's config)."""
    file = Path(path) / CONFIG_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and set(data) >= _RUN_CONFIG_KEYS


def enclosing_run_folder(path: str | os.PathLike) -> Path | None:
    """The run folder ``path`` is, or lies inside (the nearest one), else ``None``."""
    resolved = Path(path).expanduser().resolve()
    for folder in (resolved, *resolved.parents):
        if is_run_folder(folder):
            return folder
    return None


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """``path`` is ``folder`` or lies inside it (both resolved, symlinks followed)."""
    inner, outer = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return inner == outer or outer in inner.parents


# flock belongs to an open file, so a second open in this process would conflict with the first:
# the CLI, run_simulation and run_server (all in one process, Flower's server in a thread) share one.
_HELD: dict[str, list[int]] = {}  # resolved folder -> [fd, depth]
_HELD_GUARD = threading.Lock()


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

    # --- one run per folder ----------------------------------------------------------------
    def entries(self) -> list[Path]:
        """What the folder holds besides its lock file (empty when it does not exist)."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if p.name != LOCK_FILE)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``<folder>/.lock`` (``flock``, exclusive) while the block runs; re-entrant within this process.

        Raises ``RunFolderBusy`` naming the folder and the holder's pid when another process
        holds it. The kernel drops the lock when the holder dies, even by SIGKILL.
        """
        key = str(self.path.expanduser().resolve())
        with _HELD_GUARD:
            entry = _HELD.get(key)
            if entry is not None:
                entry[1] += 1
            else:
                if self.path.exists() and not self.path.is_dir():
                    raise NotADirectoryError(f"--output_dir {self.path} is a file, not a folder")
                self.path.mkdir(parents=True, exist_ok=True)
                lock_file = self.path / LOCK_FILE
                fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                        os.close(fd)
                        raise RunFolderBusy(
                            f"run folder {self.path} is in use by another SmartFed run (pid {holder} holds "
                            f"{lock_file}); wait for it to end or choose another --output_dir"
                        ) from None
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                entry = _HELD[key] = [fd, 1]
        try:
            yield
        finally:
            with _HELD_GUARD:
                entry[1] -= 1
                if entry[1] == 0:
                    del _HELD[key]
                    os.close(entry[0])  # releases the flock; the file stays (unlinking it would race)

    def check_fresh(self, *, overwrite: bool = False, keep: tuple[str, ...] = ()) -> None:
        """A fresh run may start here: the folder is empty, or ``overwrite`` and it holds a SmartFed run.

        ``keep``: paths (the run's model, adapters) that an overwrite must not delete.
        """
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"--output_dir {self.path} is a file, not a folder")
        if not self.entries():
            return
        if not overwrite and is_run_folder(self.path):
            raise FileExistsError(
                f"--output_dir {self.path} holds a SmartFed run; continue it with --resume {self.path}, "
                "choose a new folder, or add --overwrite to delete that run first"
            )
        if not overwrite:
            raise FileExistsError(
                f"--output_dir {self.path} is not empty and not a SmartFed run folder; choose a new or empty folder"
            )
        if not is_run_folder(self.path):
            raise ValueError(
                f"--overwrite: {self.path} is not a SmartFed run folder (no config.json written by SmartFed); "
                "refusing to delete it"
            )
        for path in keep:
            if path and Path(path).expanduser().exists() and is_within(path, self.path):
                raise ValueError(f"--overwrite: {path} lies inside {self.path}; refusing to delete it")

    def clear(self) -> None:
        """Delete everything but the lock file (call under ``lock()``, after ``check_fresh(overwrite=True)``)."""
        for entry in self.entries():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def check_resume(self, config: RunConfig, pool: Any = None) -> None:
        """A resume of ``config`` continues this folder's run; nothing is written.

        The settings must equal config.json's except ``RESUME_MAY_CHANGE``. ``lora_pool`` may
        name other folders when ``pool`` (the loaded ``LoraPool``) is given and its adapters'
        sha256 equal pool.json's; with ``pool``, changed adapter weights are refused too.
        A folder without config.json may be resumed only when it is empty (a run killed
        before writing anything starts afresh).
        """
        from .config import RunConfig

        if not (self.path / CONFIG_FILE).is_file():
            if self.entries():
                raise FileNotFoundError(f"--resume {self.path}: not a SmartFed run folder (no {CONFIG_FILE})")
            return
        raw = self.read_config()
        if not isinstance(raw, dict):
            raise ValueError(f"{self.path / CONFIG_FILE}: expected a JSON object")
        saved = RunConfig.from_dict(raw, source=str(self.path / CONFIG_FILE)).to_dict()
        wanted = config.to_dict()
        differ = [k for k in wanted if k not in RESUME_MAY_CHANGE and not _same_setting(k, saved, wanted)]
        if pool is None and "lora_pool" in differ and config.lora_pool and (self.path / POOL_FILE).is_file():
            from ..more import LoraPool  # other folders may hold the same adapters: compare their weights
            from .pools import resolve_pool

            pool = LoraPool.load(resolve_pool(config.lora_pool))
        if pool is not None and (self.path / POOL_FILE).is_file():
            # weights in order decide (folder names may change when adapters move)
            same_pool = [a.get("sha256") for a in self.read_pool()] == [a.sha256 for a in pool.adapters]
            if same_pool and "lora_pool" in differ:
                differ.remove("lora_pool")  # the same adapters, moved
            elif not same_pool and "lora_pool" not in differ:
                differ.append("lora_pool (adapter weights differ from pool.json)")
        if differ:
            shown = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted[k]!r}" if k in wanted else k for k in differ)
            raise ValueError(
                f"--resume {self.path}: these settings differ from its {CONFIG_FILE}: {shown}; "
                f"a resume may change only {sorted(RESUME_MAY_CHANGE)} (start a new run in another folder)"
            )
        self._check_checkpoints_cover_metrics()

    def _check_checkpoints_cover_metrics(self) -> None:
        """A resume continues from the last checkpoint and redoes at most the one round after it.

        A round's metrics line is written before its checkpoint, so a crash can leave one
        recorded round without a checkpoint; more than one means checkpoints were removed,
        and resuming would throw recorded rounds away.
        """
        recorded = max((int(row.get("round", 0)) for row in self.read_metrics()), default=0)
        last = self.last_checkpoint()
        if recorded > last + 1:
            raise ValueError(
                f"--resume {self.path}: {METRICS_FILE} records rounds up to {recorded} but the last checkpoint "
                f"in {CHECKPOINTS}/ is of round {last}; resuming would discard recorded rounds "
                "(start a new run in another folder)"
            )

    def check_run(self, config: RunConfig, *, resume: bool, overwrite: bool = False, pool: Any = None) -> None:
        """Read-only: may ``config`` start (``resume=False``) or continue (``resume=True``) here."""
        if resume and overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if resume:
            self.check_resume(config, pool)
        else:
            keep = (config.model_name_or_path, *[s.strip() for s in config.lora_pool.split(",")])
            self.check_fresh(overwrite=overwrite, keep=keep)

    @contextmanager
    def open_run(
        self, config: RunConfig, *, resume: bool, overwrite: bool = False, pool: Any = None
    ) -> Iterator[RunFolder]:
        """Check (nothing written if refused), take the lock, check again under it, clear on overwrite."""
        self.check_run(config, resume=resume, overwrite=overwrite, pool=pool)
        with self.lock():
            self.check_run(config, resume=resume, overwrite=overwrite, pool=pool)  # another run may have raced us
            if overwrite and self.entries():
                self.clear()
            yield self

    def checkpoint_path(self, server_round: int) -> Path:
        return self.path / CHECKPOINTS / f"round_{server_round:04d}.safetensors"

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.path / CONFIG_FILE, config)

    def read_config(self) -> dict[str, Any]:
        file = self.path / CONFIG_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{self.path} is not a SmartFed run folder (no {CONFIG_FILE})")
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{file}: not valid JSON ({err})") from err
        if isinstance(config, dict):  # written before a setting existed: what that run used (LEGACY_SETTINGS)
            config = {**LEGACY_SETTINGS, **config}
        return config

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
            cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            payload_json = json.dumps(payload, sort_keys=True)
            metadata = {"format": "pt", PAYLOAD_KEY: payload_json, CHECKSUM_KEY: tensors_sha256(cpu, payload_json)}
            save_file(cpu, tmp, metadata=metadata)
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
        """(tensors, payload) of a round, its checksum verified (checkpoints older than checksums have none)."""
        path = self.checkpoint_path(server_round)
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as fh:
                metadata = fh.metadata() or {}
            payload_json = metadata.get(PAYLOAD_KEY, "{}")
            payload, tensors = json.loads(payload_json), load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"checkpoint {path}: cannot read it ({err})") from err
        expected = metadata.get(CHECKSUM_KEY)
        if expected is not None and tensors_sha256(tensors, payload_json) != expected:
            raise ValueError(
                f"checkpoint {path}: its tensors do not match the sha256 recorded when it was written (damaged file)"
            )
        return tensors, payload

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
