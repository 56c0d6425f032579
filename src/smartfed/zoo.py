"""The example LoRA pool: skill adapters trained with PEFT, deterministic, with a manifest.

``smartfed zoo build`` trains one LoRA per skill of the default benchmark
(``smartfed.data.composite``: math, json, spanish, code) on the base model, scores
each on its own skill and on every composition, and writes

    <out>/<adapter>/adapter_config.json, adapter_model.safetensors   (PEFT format)
    <out>/manifest.json   (command, seed, base model, data hashes, file hashes, metrics)

The adapters are a few MB each, so the project commits them under ``zoo/`` and
``make demo`` need not train them; the manifest says how to rebuild them.
``--skills code`` builds one adapter into an existing zoo: the other adapters'
folders and manifest entries (each with its own command and config) stay as
they are, and the base's scores gain the new skill and compositions.
``--lora_pool zoo:math,zoo:json`` (or ``zoo:`` for every adapter) names them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from .data import batches, load_task
from .data.composite import COMPOSITES, SKILLS
from .eval import evaluate_task
from .files import sibling_temp_dir
from .run.pools import MANIFEST, ZOO_PREFIX, default_zoo_dir, read_manifest, resolve_pool

MAX_ADAPTER_BYTES = 8 * 1024 * 1024  # what the repository accepts per committed adapter


@dataclass
class ZooConfig:
    """How the skill adapters are trained (defaults: the feasibility runs of the benchmark issue)."""

    base_model: str = field(default="smollm2-135m", metadata={"help": "Base model (name, folder or .gguf)."})
    skills: str = field(default="math,json,spanish,code", metadata={"help": "Comma-separated adapters to train."})
    steps: int = field(default=150, metadata={"help": "Training steps per adapter."})
    batch_size: int = field(default=8, metadata={"help": "Batch size."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate."})
    rank: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    target_modules: str = field(default="q_proj,v_proj,o_proj", metadata={"help": "LoRA target modules."})
    num_train: int = field(default=1200, metadata={"help": "Training items per skill."})
    num_test: int = field(default=100, metadata={"help": "Held-out items per skill and composition scored."})
    max_length: int = field(default=96, metadata={"help": "Token length of a training example."})
    seed: int = field(default=0, metadata={"help": "Seed of data, LoRA init and batches."})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "rank", "num_train", "num_test", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"zoo: {name}={value!r} must be a positive integer")
        if not self.learning_rate > 0 or not self.alpha > 0:
            raise ValueError(f"zoo: learning_rate={self.learning_rate!r} and alpha={self.alpha!r} must be > 0")
        unknown = [s for s in self.skill_list() if s not in SKILLS]
        if unknown or not self.skill_list():
            raise ValueError(f"zoo: skills={self.skills!r}: unknown {unknown}; known skills: {sorted(SKILLS)}")

    def skill_list(self) -> list[str]:
        return [s.strip() for s in self.skills.split(",") if s.strip()]


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _data_hash(dataset: Any) -> str:
    """sha256 of the training items as JSON lines: the manifest's proof of what each adapter saw."""
    lines = (
        json.dumps({"prompt": p, "answer": a}, ensure_ascii=False)
        for p, a in zip(dataset["prompt"], dataset["answer"], strict=True)
    )
    return _sha256_bytes("\n".join(lines).encode())


def _train_adapter(base: torch.nn.Module, tokenizer: Any, skill: str, config: ZooConfig) -> tuple[Any, dict]:
    """PEFT LoRA on one skill; returns the PeftModel and what the manifest records of its data."""
    task, train, _ = load_task(SKILLS[skill], seed=config.seed, num_train=config.num_train, num_test=config.num_test)
    torch.manual_seed(config.seed)  # PEFT initialises lora_A from the global RNG
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=[m.strip() for m in config.target_modules.split(",")],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / config.steps)
    model.train()
    losses = []
    stream = batches(
        train,
        tokenizer,
        batch_size=config.batch_size,
        steps=config.steps,
        seed=config.seed,
        max_length=config.max_length,
    )
    for batch in tqdm(stream, total=config.steps, desc=f"zoo {skill}", leave=False):
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    info = {
        "task": task.name,
        "num_train": len(train),
        "data_sha256": _data_hash(train),
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
    }
    return model, info


def _score(model: Any, tokenizer: Any, task_name: str, config: ZooConfig) -> float:
    task, _, test = load_task(task_name, seed=config.seed, num_train=1, num_test=config.num_test)
    with torch.no_grad():
        return float(evaluate_task(model, tokenizer, task, test, max_new_tokens=16, batch_size=32)["score"])


SCORING_FIELDS = ("base_model", "num_test", "seed")
"""What a base score depends on: an earlier build with the same values scored the base on the same items."""


def _same_scoring(previous: Any, config: ZooConfig) -> bool:
    """True when an earlier build's ``config`` scored the base as ``config`` would (its scores can be reused)."""
    return isinstance(previous, dict) and all(previous.get(f) == getattr(config, f) for f in SCORING_FIELDS)


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: _sha256_bytes(p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}


def build_zoo(config: ZooConfig, out_dir: str | os.PathLike[str], *, command: str | None = None) -> dict[str, Any]:
    """Train, score and save every skill adapter of ``config`` into ``out_dir``; returns the manifest.

    Each adapter folder is written to a temp folder and renamed into place, and
    the manifest last, so an interrupted build leaves the old zoo or a whole new one.
    Into an existing zoo, the adapters not built keep their folders and manifest
    entries; the base's scores of the earlier build are kept where its base
    model, ``num_test`` and seed are this build's (the same items), and the base
    is scored only on the tasks it has no score for.
    """
    from .models import load_model_and_tokenizer

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "command": command or " ".join(["smartfed", *sys.argv[1:]]),
        "config": asdict(config),
        "torch": torch.__version__,
        "adapters": {},
    }
    previous_base_scores: dict[str, float] = {}
    reusable: dict[str, float] = {}
    if (out / MANIFEST).is_file():  # rebuilding some skills keeps the others' records, each with its own command
        previous = read_manifest(out)
        previous_base_scores = previous.get("base_scores", {})
        if _same_scoring(previous.get("config"), config):
            reusable = previous_base_scores
        manifest["adapters"] = {
            k: {"command": previous.get("command"), "config": previous.get("config"), **v}
            for k, v in previous["adapters"].items()
            if k not in config.skill_list()
        }
    base, tokenizer = load_model_and_tokenizer(config.base_model)
    base_tasks = [*(SKILLS[s] for s in config.skill_list()), *COMPOSITES]
    manifest["base_scores"] = {
        **previous_base_scores,
        **{t: reusable[t] if t in reusable else _score(base, tokenizer, t, config) for t in base_tasks},
    }
    for skill in config.skill_list():
        started = time.monotonic()
        model, info = _train_adapter(base, tokenizer, skill, config)
        scores = {t: _score(model, tokenizer, t, config) for t in [SKILLS[skill], *COMPOSITES]}
        staging = sibling_temp_dir(out / skill)
        model.save_pretrained(staging)
        final = out / skill
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        base = model.unload()  # the frozen base, without LoRA layers, for the next skill
        size = sum(p.stat().st_size for p in final.iterdir())
        if size > MAX_ADAPTER_BYTES:
            raise ValueError(f"zoo: adapter {final} is {size} bytes, over the {MAX_ADAPTER_BYTES}-byte limit")
        manifest["adapters"][skill] = {
            "command": manifest["command"],
            "config": manifest["config"],
            **info,
            "scores": scores,
            "bytes": size,
            "files": _file_hashes(final),
            "train_seconds": round(time.monotonic() - started, 1),
        }
        _write_json(out / MANIFEST, manifest)  # after each adapter: a partial build still says what it holds
    return manifest


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


__all__ = ["MANIFEST", "ZOO_PREFIX", "ZooConfig", "build_zoo", "default_zoo_dir", "read_manifest", "resolve_pool"]
