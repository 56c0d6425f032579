"""From a finished federation to a model people use: ``smartfed.load``.

Two ways in, PEFT-style (the model comes back ready: MoRE attached, routers and
quotas loaded, eval mode):

* ``smartfed.load(run_dir)`` reads a run folder written by ``smartfed run``: the
  base model and tokenizer named in ``config.json``, the LoRA pool of the run
  (each adapter's weights checked against the sha256 recorded in ``pool.json``),
  the routers of the last checkpoint and the quotas of its server payload::

      model, tokenizer = smartfed.load("runs/smartfed")       # unpacks like PEFT code
      loaded = smartfed.load("runs/smartfed", checkpoint=3)   # or keep everything
      loaded.model, loaded.tokenizer, loaded.config, loaded.round, loaded.quotas

* ``smartfed.load_router_file(model, pool, router_file)`` attaches MoRE to a model
  you already hold, over a pool you name, with routers saved by
  ``MoreModel.save_router`` (the file carries its ``MoreConfig``)::

      model = smartfed.load_router_file(base, ["adapters/math", "adapters/json"], "router.safetensors")

Errors: a missing run folder, config, ``pool.json`` or checkpoint raises
``FileNotFoundError`` naming it; an adapter whose weights differ from the ones the
routers were trained over raises ``ValueError`` naming the adapter and both hashes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..more import LoraPool, MoreConfig, MoreModel, attach_more
from ..more.model import ROUTER_CONFIG_KEY, ROUTER_EXPERTS_KEY, ROUTER_QUOTAS_KEY
from ..run.config import RunConfig
from ..run.folder import CHECKPOINTS, CONFIG_FILE, POOL_FILE, RunFolder
from ..run.pools import resolve_pool

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PoolSource = LoraPool | str | os.PathLike | Sequence[str | os.PathLike]


@dataclass
class Loaded:
    """A run folder loaded for inference.

    Unpacks as ``model, tokenizer = smartfed.load(run_dir)``; the other fields
    say where the model came from.
    """

    model: nn.Module  # a MoreModel for SmartFed runs: forward/generate like the transformers model
    tokenizer: PreTrainedTokenizerBase
    config: RunConfig
    round: int  # the checkpoint's round
    payload: dict[str, Any] = field(default_factory=dict)  # the server payload of that round
    run_dir: Path = field(default_factory=Path)
    pool: LoraPool | None = None

    @property
    def quotas(self) -> dict[str, int]:
        """K_t per MoRE matrix, as loaded (empty for a model without quotas)."""
        return dict(self.model.quotas()) if hasattr(self.model, "quotas") else {}

    def __iter__(self) -> Iterator[Any]:
        yield self.model
        yield self.tokenizer


def _run_folder(run_dir: str | os.PathLike) -> tuple[RunFolder, RunConfig]:
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {path} does not exist" if not path.exists() else f"{path} is not a folder")
    folder = RunFolder(path)
    raw = folder.read_config()  # FileNotFoundError naming config.json
    if not isinstance(raw, dict):
        raise ValueError(f"{path / CONFIG_FILE}: expected a JSON object")
    return folder, RunConfig.from_dict(raw, source=str(path / CONFIG_FILE))


def _checkpoint_round(folder: RunFolder, checkpoint: int | None) -> int:
    if checkpoint is None:
        last = folder.last_checkpoint()
        if last == 0:
            raise FileNotFoundError(
                f"run folder {folder.path}: no checkpoint in {folder.path / CHECKPOINTS} (no round has finished)"
            )
        return last
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, int) or checkpoint < 1:
        raise ValueError(f"checkpoint={checkpoint!r} must be a round number >= 1")
    path = folder.checkpoint_path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"run folder {folder.path}: no checkpoint {path.name} for round {checkpoint}")
    return checkpoint


def _load_pool(folder: RunFolder, config: RunConfig, pool: PoolSource | None, verify: bool) -> LoraPool:
    recorded = folder.read_pool() if verify else None  # FileNotFoundError naming pool.json
    if isinstance(pool, LoraPool):
        loaded = pool
    else:
        sources = resolve_pool(config.lora_pool) if pool is None else pool
        if not sources:
            raise ValueError(f"run folder {folder.path}: config.json has no lora_pool and no pool= was given")
        if isinstance(sources, (str, os.PathLike)):
            sources = [s.strip() for s in str(sources).split(",") if s.strip()]
        sources = [str(s) for s in sources]
        # Name the adapters as the run did, so that the check below pairs them even from moved folders.
        names = [a["name"] for a in recorded] if recorded else None
        if names is not None and len(sources) != len(names):
            raise ValueError(
                f"pool: {len(sources)} adapter(s) given, but {folder.path / POOL_FILE} records {len(names)} {names}"
            )
        loaded = LoraPool.load(sources, names=names)
    if recorded is not None:
        check_pool(loaded, recorded, where=folder.path / POOL_FILE)
    return loaded


def check_pool(pool: LoraPool, recorded: Sequence[dict[str, Any]], *, where: str | os.PathLike = POOL_FILE) -> None:
    """Refuse a pool whose adapters are not, weight for weight, the ones ``recorded`` (pool.json) names."""
    if len(pool.adapters) != len(recorded):
        raise ValueError(
            f"pool has {len(pool.adapters)} adapter(s) {[a.name for a in pool.adapters]}, "
            f"{where} records {len(recorded)} {[r.get('name') for r in recorded]}"
        )
    for adapter, entry in zip(pool.adapters, recorded, strict=True):
        expected = entry.get("sha256")
        if adapter.sha256 != expected:
            raise ValueError(
                f"LoRA adapter {entry.get('name', adapter.name)!r} ({adapter.path}): its weights have sha256 "
                f"{adapter.sha256}, but {where} records {expected}; the routers were trained over other weights"
            )


def load(
    run_dir: str | os.PathLike,
    *,
    checkpoint: int | None = None,
    pool: PoolSource | None = None,
    device: str | torch.device | None = None,
    verify_pool: bool = True,
    dtype: str | None = None,
    load_in_4bit: bool | None = None,
    load_in_8bit: bool | None = None,
) -> Loaded:
    """Load a SmartFed run folder for inference.

    Args:
        run_dir: the ``--output_dir`` of ``smartfed run``.
        checkpoint: the round to load (default: the last one).
        pool: the LoRA adapters, when they moved since the run (folders or
            Hub ids in the run's order, or a ``LoraPool``); default: the
            ``lora_pool`` of ``config.json``.
        device: where to load the model: "auto", "cpu", "cuda", "cuda:N" or a
            ``torch.device`` (default: the CPU).
        verify_pool: check every adapter's sha256 against ``pool.json``.
        dtype: the base's dtype, as ``--dtype`` (default: the run's ``dtype``, resolved
            for ``device``; float32 for runs recorded before the setting existed).
        load_in_4bit, load_in_8bit: quantise the base with bitsandbytes (default: as the run did).

    Returns:
        ``Loaded(model, tokenizer, config, round, payload, run_dir, pool)``; it
        unpacks as ``model, tokenizer``. The model is in eval mode with the
        checkpoint's routers and the quotas of its payload.

    Raises:
        FileNotFoundError: no run folder, ``config.json``, ``pool.json``, checkpoint,
            adapter or base model.
        ValueError: an adapter whose sha256 differs from ``pool.json`` (adapter and
            both hashes named), a checkpoint that does not fit the model.
        TypeError: a model was passed; use ``load_router_file(model, pool, router_file)``.
    """
    if isinstance(run_dir, nn.Module):
        raise TypeError(
            "smartfed.load takes a run folder; for a model, a pool and a router file use "
            "smartfed.load_router_file(model, pool, router_file)"
        )
    from ..methods import get_method_class, load_builtin_methods
    from ..models import load_model_and_tokenizer, place_on
    from ..run.seeds import derive_seed

    folder, config = _run_folder(run_dir)
    server_round = _checkpoint_round(folder, checkpoint)
    uses_pool = bool(config.lora_pool or pool is not None)  # methods that train from scratch record no pool
    lora_pool = _load_pool(folder, config, pool, verify_pool) if uses_pool else None
    load_builtin_methods()
    method = get_method_class(config.method)(config)
    target = _device(device)
    model, tokenizer = load_model_and_tokenizer(
        config.model_name_or_path,
        device=target,
        dtype=config.dtype if dtype is None else dtype,
        load_in_4bit=config.load_in_4bit if load_in_4bit is None else load_in_4bit,
        load_in_8bit=config.load_in_8bit if load_in_8bit is None else load_in_8bit,
    )
    model = method.build(model, lora_pool, torch.Generator().manual_seed(derive_seed(config.seed, "init")))
    if target.type != "cpu":
        place_on(model, target)  # what the method made on the CPU joins the base
    tensors, payload = folder.load_checkpoint(server_round)
    path = folder.checkpoint_path(server_round)
    state_keys = set(method.get_state(model))
    try:
        method.set_state(model, {k: v for k, v in tensors.items() if k in state_keys})
        method.restore_payload(model, payload)
    except (ValueError, KeyError) as err:  # a method may index the tensors or the payload by key
        detail = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        raise ValueError(f"checkpoint {path}: {detail}") from err
    model.eval()
    return Loaded(model, tokenizer, config, server_round, payload, folder.path, lora_pool)


def _device(device: str | torch.device | None) -> torch.device:
    """``load``'s device: the CPU by default, a ``--device`` form resolved (auto, cuda:N), anything else as torch reads it."""
    from ..models import is_device_spec, resolve_device

    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    if is_device_spec(device):
        return resolve_device(device)
    try:  # another torch device ("mps", "xpu:0"), as earlier releases moved the model to
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N ({err})") from None


def _router_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"router file {path} does not exist")
    try:
        with safe_open(path, framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"router file {path}: not a readable safetensors file ({err})") from err


def load_router_file(
    model: nn.Module | str,
    pool: PoolSource,
    router_file: str | os.PathLike,
    *,
    config: MoreConfig | None = None,
    quotas: dict[str, int] | None = None,
    device: str | torch.device | None = None,
) -> MoreModel:
    """Attach MoRE to ``model`` over ``pool`` and load routers saved by ``MoreModel.save_router``.

    Args:
        model: a transformers model (modified in place, as ``get_peft_model``
            does) or a model id / folder to load.
        pool: a ``LoraPool`` or the adapter folders / Hub ids.
        router_file: a safetensors file from ``MoreModel.save_router``.
        config: the ``MoreConfig`` to attach with (default: the one stored in the file).
        quotas: per-matrix K_t to set (default: ``smartfed.quotas`` from the file's
            metadata when present, else the config's ``top_k``).

    Returns:
        The ``MoreModel``, in eval mode.
    """
    path = Path(router_file).expanduser()
    metadata = _router_metadata(path)
    if config is None:
        if ROUTER_CONFIG_KEY not in metadata:
            raise ValueError(
                f"router file {path}: no {ROUTER_CONFIG_KEY!r} metadata (not written by MoreModel.save_router); "
                "pass config=MoreConfig(...)"
            )
        try:
            config = MoreConfig.from_dict(json.loads(metadata[ROUTER_CONFIG_KEY]))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"router file {path}: bad {ROUTER_CONFIG_KEY!r} metadata ({err})") from err
    lora_pool = pool if isinstance(pool, LoraPool) else LoraPool.load(pool)
    if ROUTER_EXPERTS_KEY in metadata:
        saved = json.loads(metadata[ROUTER_EXPERTS_KEY])
        for name, count in saved.items():
            module = lora_pool.modules.get(name)
            if module is None:
                raise ValueError(
                    f"router file {path}: module {name!r} has a router, but the pool has no experts for it"
                )
            if module.num_experts != count:
                raise ValueError(
                    f"router file {path}: module {name!r} was routed over {count} experts, "
                    f"the pool gives it {module.num_experts} (another pool, or adapters in another order?)"
                )
    from ..models import load_model_and_tokenizer, place_on

    if isinstance(model, (str, os.PathLike)):
        model, _ = load_model_and_tokenizer(str(model), device=_device(device))
    more = attach_more(model, lora_pool, config)
    more.load_router(path)
    if quotas is None and ROUTER_QUOTAS_KEY in metadata:
        quotas = {k: int(v) for k, v in json.loads(metadata[ROUTER_QUOTAS_KEY]).items()}
    if quotas:
        more.set_quotas(dict(quotas))
    if device is not None:
        place_on(more, _device(device))  # not .to(): a bitsandbytes base cannot move
    return more.eval()
