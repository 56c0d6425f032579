"""A pool of existing PEFT LoRA adapters, cut into rank-one experts.

A rank-r LoRA update of matrix t is ``ΔW_t = s · B A = Σ_i s · B[:, i] A[i]``: r
rank-one pieces that SmartFed (Wu et al., 2025; docs/design.md §1) treats as independent
experts. The pool stacks the pieces of every adapter that targets t into
``A_t (M_t, d_in)``, ``B_t (d_out, M_t)`` and ``scale_t (M_t,)`` with
``M_t = Σ_n r_n`` and ``s = α/r`` (``α/√r`` for rsLoRA).

Only safetensors are read (never a pickle): ``adapter_config.json`` and
``adapter_model.safetensors`` as written by PEFT's ``save_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

# "base_model.model.<module>.lora_A.weight" (PEFT strips the adapter name on save).
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class AdapterInfo:
    """What the pool knows of one adapter."""

    name: str
    source: str
    path: Path
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    base_model_name_or_path: str | None
    sha256: str


@dataclass
class PoolModule:
    """The stacked rank-one experts of one target matrix.

    ``adapter_index[m]`` and ``rank_index[m]`` say which adapter of the pool, and
    which of its ranks, expert m came from.
    """

    name: str
    A: torch.Tensor  # (M, d_in)
    B: torch.Tensor  # (d_out, M)
    scale: torch.Tensor  # (M,)
    adapter_index: torch.Tensor  # (M,) long
    rank_index: torch.Tensor  # (M,) long

    @property
    def num_experts(self) -> int:
        return self.A.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_source(source: str | Path) -> Path:
    """A local adapter folder, or a Hub repo id downloaded to the local cache."""
    path = Path(source).expanduser()
    if path.is_symlink() and not path.exists():  # a loop or a dangling link: never a Hub id
        raise FileNotFoundError(f"LoRA adapter {str(source)!r}: {path} is a broken symlink or a symlink loop")
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"LoRA adapter {str(source)!r}: {path} is a file, expected an adapter folder")
        return path
    looks_like_hub_id = isinstance(source, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None
    if not looks_like_hub_id:
        raise FileNotFoundError(f"LoRA adapter {str(source)!r}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(source, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    except Exception as err:  # offline, unknown repo, gated repo: all mean "not found here"
        raise FileNotFoundError(
            f"LoRA adapter {source!r}: not a local folder and not downloadable from the Hub ({type(err).__name__}: {err})"
        ) from err
    return Path(local)


def _pattern_value(pattern: dict[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module-name suffix or regex."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _read_config(name: str, path: Path) -> dict:
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"LoRA adapter {name!r}: missing {config_file}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"LoRA adapter {name!r}: {config_file} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"LoRA adapter {name!r}: {config_file} must hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"LoRA adapter {name!r}: peft_type={peft_type!r} in {config_file}; MoRE takes LoRA adapters")
    if config.get("use_dora"):
        raise ValueError(
            f"LoRA adapter {name!r}: use_dora=true in {config_file}; DoRA is not a sum of rank-one experts"
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not _positive_number(value):
            raise ValueError(
                f"LoRA adapter {name!r}: field {key!r}={value!r} in {config_file} must be a finite positive number"
            )
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"LoRA adapter {name!r}: field {key!r} in {config_file} must be a JSON object")
        for module, value in pattern.items():
            if not _positive_number(value) or (key == "rank_pattern" and not isinstance(value, int)):
                kind = "a positive integer" if key == "rank_pattern" else "a finite positive number"
                raise ValueError(f"LoRA adapter {name!r}: {key}[{module!r}]={value!r} in {config_file} must be {kind}")
            try:
                re.compile(module)
            except re.error as err:  # not a ValueError: PEFT matches the keys as regular expressions
                raise ValueError(
                    f"LoRA adapter {name!r}: {key} key {module!r} in {config_file} is not a valid pattern ({err})"
                ) from None
    return config


def _positive_number(value: object) -> bool:
    """A finite number > 0 (not a bool, not a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _read_weights(name: str, path: Path) -> dict[str, torch.Tensor]:
    weights_file = path / WEIGHTS_NAME
    if not weights_file.is_file():
        hint = (
            " (only a pickled adapter_model.bin is there: convert it to safetensors)"
            if (path / PICKLE_WEIGHTS_NAME).exists()
            else ""
        )
        raise FileNotFoundError(f"LoRA adapter {name!r}: missing {weights_file}{hint}")
    try:
        weights = load_file(weights_file)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"LoRA adapter {name!r}: cannot read {weights_file}: {err}") from err
    for key, tensor in weights.items():
        # one NaN/Inf expert turns every routed output (and so every training step) into NaN
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"LoRA adapter {name!r}: tensor {key!r} in {weights_file} has {bad} non-finite value(s) (NaN/Inf)"
            )
    return weights


def _split_pairs(name: str, weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group the tensors of one adapter into (A, B) per module, refusing anything else."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise ValueError(
                f"LoRA adapter {name!r}: tensor {key!r} is not a LoRA A/B weight of a Linear layer "
                "(MoRE supports plain LoRA; not modules_to_save, embeddings, biases or DoRA)"
            )
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    pairs = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(
                f"LoRA adapter {name!r}: module {module!r} has lora_{''.join(ab)} but not both lora_A and lora_B"
            )
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"LoRA adapter {name!r}: module {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                "expected (r, d_in) and (d_out, r)"
            )
        pairs[module] = (a, b)
    if not pairs:
        raise ValueError(f"LoRA adapter {name!r}: {WEIGHTS_NAME} holds no LoRA weights")
    return pairs


class LoraPool:
    """Rank-one experts of N PEFT LoRA adapters, stacked per target matrix."""

    def __init__(self, adapters: Sequence[AdapterInfo], modules: dict[str, PoolModule]) -> None:
        self.adapters = list(adapters)
        self.modules = dict(modules)

    @classmethod
    def load(
        cls,
        sources: str | Path | Iterable[str | Path],
        *,
        names: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> LoraPool:
        """Read PEFT adapter folders (or Hub ids, where a hub is reachable) into a pool.

        ``sources`` may be one path, a list, or a comma-separated string. ``names``
        label the adapters (default: the folder names, made unique).
        """
        if isinstance(sources, (str, Path)):
            sources = [s.strip() for s in str(sources).split(",") if s.strip()]
        sources = list(sources)
        if not sources:
            raise ValueError("LoraPool.load: no adapter sources given")
        _refuse_duplicates(sources)
        names = list(names) if names is not None else _default_names(sources)
        if len(names) != len(sources) or len(set(names)) != len(names):
            raise ValueError(f"LoraPool.load: names {names} must be unique, one per source ({len(sources)})")

        adapters: list[AdapterInfo] = []
        per_module: dict[str, list[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
        for index, (name, source) in enumerate(zip(names, sources, strict=True)):
            info, pairs = _load_adapter(name, source)
            adapters.append(info)
            for module, (a, b, scale) in pairs.items():
                per_module.setdefault(module, []).append((index, a, b, scale))
        modules = {m: _stack(m, entries, adapters, dtype) for m, entries in sorted(per_module.items())}
        return cls(adapters, modules)

    @property
    def module_names(self) -> list[str]:
        return list(self.modules)

    @property
    def num_experts(self) -> int:
        """Rank-one experts over all matrices."""
        return sum(m.num_experts for m in self.modules.values())

    def expert_origin(self, module: str) -> list[tuple[str, int]]:
        """(adapter name, rank index) of every expert of ``module``, in stacking order."""
        pm = self.modules[module]
        return [
            (self.adapters[a].name, int(r))
            for a, r in zip(pm.adapter_index.tolist(), pm.rank_index.tolist(), strict=True)
        ]

    def adapter_experts(self, module: str, adapter: str) -> torch.Tensor:
        """Indices of ``adapter``'s experts among the experts of ``module``."""
        index = [a.name for a in self.adapters].index(adapter)
        return torch.nonzero(self.modules[module].adapter_index == index).flatten()

    def __len__(self) -> int:
        return len(self.adapters)

    def __repr__(self) -> str:
        names = ", ".join(f"{a.name}(r={a.rank})" for a in self.adapters)
        return f"LoraPool([{names}], matrices={len(self.modules)}, experts={self.num_experts})"


def _refuse_duplicates(sources: Sequence[str | Path]) -> None:
    """The same adapter twice would only duplicate its experts (and halve each one's share of the router)."""
    seen: dict[str, str] = {}
    for source in sources:
        path = Path(source).expanduser()
        key = str(path.resolve()) if path.exists() else str(source)
        if key in seen:
            also = "" if str(source) == seen[key] else f" (as {seen[key]!r} and {str(source)!r})"
            raise ValueError(f"LoRA adapter {str(source)!r} is given twice in the pool{also}")
        seen[key] = str(source)


def _default_names(sources: Sequence[str | Path]) -> list[str]:
    names: list[str] = []
    for source in sources:
        base = Path(str(source).rstrip("/")).name or str(source)
        name, i = base, 1
        while name in names:
            i += 1
            name = f"{base}_{i}"
        names.append(name)
    return names


def _load_adapter(
    name: str, source: str | Path
) -> tuple[AdapterInfo, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    path = _resolve_source(source)
    config = _read_config(name, path)
    pairs = _split_pairs(name, _read_weights(name, path))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    scaled = {}
    for module, (a, b) in pairs.items():
        r = a.shape[0]
        expected_r = _pattern_value(rank_pattern, module, config["r"])
        if r != expected_r:
            raise ValueError(
                f"LoRA adapter {name!r}: module {module!r} has rank {r} in its weights but {expected_r} in its config"
            )
        alpha = float(_pattern_value(alpha_pattern, module, config["lora_alpha"]))
        scaled[module] = (a, b, alpha / math.sqrt(r) if use_rslora else alpha / r)
    info = AdapterInfo(
        name=name,
        source=str(source),
        path=path,
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        use_rslora=use_rslora,
        target_modules=tuple(pairs),
        base_model_name_or_path=config.get("base_model_name_or_path"),
        sha256=_sha256(path / WEIGHTS_NAME),
    )
    return info, scaled


def _stack(
    module: str,
    entries: list[tuple[int, torch.Tensor, torch.Tensor, float]],
    adapters: list[AdapterInfo],
    dtype: torch.dtype,
) -> PoolModule:
    first = adapters[entries[0][0]].name
    d_in, d_out = entries[0][1].shape[1], entries[0][2].shape[0]
    for index, a, b, _ in entries[1:]:
        if (a.shape[1], b.shape[0]) != (d_in, d_out):
            raise ValueError(
                f"LoRA adapters {first!r} and {adapters[index].name!r} disagree on module {module!r}: "
                f"(d_in, d_out) = {(d_in, d_out)} vs {(a.shape[1], b.shape[0])}; were they trained on the same base model?"
            )
    limit = torch.finfo(dtype).max
    for index, _, _, scale in entries:
        if not abs(scale) <= limit:  # also NaN
            raise ValueError(
                f"LoRA adapter {adapters[index].name!r}: module {module!r} has the scale lora_alpha / r = {scale!r}, "
                f"which {dtype} cannot hold; check lora_alpha (and alpha_pattern) in its adapter_config.json"
            )
    ranks = [a.shape[0] for _, a, _, _ in entries]
    return PoolModule(
        name=module,
        A=torch.cat([a.to(dtype) for _, a, _, _ in entries], dim=0),  # (M, d_in)
        B=torch.cat([b.to(dtype) for _, _, b, _ in entries], dim=1),  # (d_out, M)
        scale=torch.cat(
            [torch.full((r,), s, dtype=dtype) for r, (_, _, _, s) in zip(ranks, entries, strict=True)]
        ),  # (M,)
        adapter_index=torch.cat(
            [torch.full((r,), i, dtype=torch.long) for r, (i, _, _, _) in zip(ranks, entries, strict=True)]
        ),
        rank_index=torch.cat([torch.arange(r) for r in ranks]),
    )
