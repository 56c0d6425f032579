"""Export a routed MoRE model to a static PEFT LoRA adapter.

The routed update of one matrix is ``Δy = Σ_m g_m(x) s_m B_m (A_m x)``: its gates
depend on the token. A static adapter replaces them by their mean over a
calibration set, ``ḡ_m = E_x[g_m(x)]`` (``MoreModel.tracking_expert_stats``,
``gate_mass``), which gives one fixed matrix per target::

    ΔW = Σ_m ḡ_m s_m B_m A_m = B' A,    B' = lora_B · diag(ḡ)   (lora_B has s folded in)

``ΔW`` has rank ≤ M (the matrix's expert count). It is compressed to rank R by a
truncated SVD computed from the factors, never forming the d_out × d_in
product: thin QR of ``B' = Q_B R_B`` and ``Aᵀ = Q_A R_A``, SVD of the small core
``R_B R_Aᵀ = U S Vᵀ``, so ``ΔW = (Q_B U) S (Q_A V)ᵀ``; the R largest singular
values are kept and split as ``√S`` into both factors. By Eckart–Young this is
the best rank-R approximation of ``ΔW`` in Frobenius and spectral norm; with
R ≥ rank(ΔW) it is exact. A matrix with fewer than R experts is padded with
zero components so that every matrix of the adapter has rank R (still exact).

The adapter is written by PEFT itself: ``LoraConfig(r=R, lora_alpha=R,
target_modules=[exact module names])`` (scale α/r = 1) on a copy of the base
model, the factors copied into ``lora_A``/``lora_B``, ``save_pretrained`` into a
temporary folder renamed into place. Load it like any LoRA::

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "export/")

What the static form loses is the per-token routing: ``compare_scores`` scores
the routed model and the export on the same held-out items.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data.collate import encode_examples, encode_prompt, text_bound
from ..files import sibling_temp_dir
from ..more import MoreModel

REPORT_FILE = "smartfed_export.json"
_QUIET = {"message": ".*is_gradient_checkpointing", "category": FutureWarning}  # PEFT on transformers 5
"""Written beside the adapter: rank, per-matrix truncation error, calibration, scores."""


@dataclass
class LowRank:
    """A rank-``rank`` factorisation ``B @ A`` of a product of factors."""

    B: torch.Tensor  # (d_out, rank)
    A: torch.Tensor  # (rank, d_in)
    singular_values: torch.Tensor  # every singular value of the full product, descending
    rel_error: float  # ‖ΔW − B A‖_F / ‖ΔW‖_F (0 for a zero ΔW)

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def low_rank_factors(B: torch.Tensor, A: torch.Tensor, rank: int) -> LowRank:
    """Best rank-``rank`` approximation of ``B @ A`` (B: (d_out, M), A: (M, d_in)) from the factors.

    Computed in float64 through thin QRs of ``B`` and ``Aᵀ`` and the SVD of their
    small core: O((d_out + d_in) M²) time, never a d_out × d_in matrix. The
    singular values are split as √S into both factors. Where ``rank`` exceeds the
    rank bound min(M, d_out, d_in) the factors are padded with zeros (exact).
    Returns factors in ``B``'s dtype.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} must be a positive int")
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"low_rank_factors: B {tuple(B.shape)} and A {tuple(A.shape)} are not (d_out, M), (M, d_in)")
    dtype = B.dtype
    q_b, r_b = torch.linalg.qr(B.double(), mode="reduced")  # (d_out, p), (p, M)
    q_a, r_a = torch.linalg.qr(A.double().T, mode="reduced")  # (d_in, q), (q, M)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # core (p, q)
    keep = min(rank, s.shape[0])
    root = s[:keep].sqrt()
    new_b = torch.zeros(B.shape[0], rank, dtype=torch.float64, device=B.device)
    new_a = torch.zeros(rank, A.shape[1], dtype=torch.float64, device=A.device)
    new_b[:, :keep] = (q_b @ u[:, :keep]) * root
    new_a[:keep] = root[:, None] * (vh[:keep] @ q_a.T)
    total = float(s.square().sum())
    rel_error = math.sqrt(max(float(s[keep:].square().sum()), 0.0) / total) if total > 0 else 0.0
    return LowRank(new_b.to(dtype), new_a.to(dtype), s.float().cpu(), rel_error)


def calibration_batches(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str] | None = None,
    *,
    max_length: int = 128,
) -> Iterator[dict[str, torch.Tensor]]:
    """One unpadded batch per example (so no padding token is counted in the gate means).

    With ``answers``: the training encoding (prompt, answer, eos), the tokens the
    model routes while it writes an answer; without: the formatted prompt only.
    """
    for i, prompt in enumerate(prompts):
        if answers is not None:
            encoded = encode_examples(tokenizer, [prompt], [answers[i]], max_length=max_length)
            yield {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        else:
            text = prompt[-text_bound(max_length) :]  # only its last max_length tokens are kept
            ids = torch.tensor([encode_prompt(tokenizer, text)[-max_length:]], dtype=torch.long)
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def mean_gates(model: MoreModel, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """ḡ per MoRE matrix: each expert's gate averaged over every token of ``batches`` ((M,) float32).

    The model runs in eval mode under its current quotas; padding positions of
    a batch would count as tokens, so give unpadded batches (``calibration_batches``).
    """
    if not isinstance(model, MoreModel):
        raise TypeError(f"mean_gates needs a MoreModel, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with model.tracking_expert_stats():
            for batch in batches:
                model(**{k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")})
        stats = model.expert_stats()
    finally:
        model.train(was_training)
    if not stats or next(iter(stats.values()))["tokens"] == 0:
        raise ValueError("mean_gates: the calibration batches held no tokens")
    return {name: s["gate_mass"] for name, s in stats.items()}


@dataclass
class MatrixExport:
    name: str
    experts: int  # M
    rank: int  # R written
    mixture_rank: int  # numerical rank of ΔW = B' A
    rel_error: float  # ‖ΔW − ΔW_R‖_F / ‖ΔW‖_F
    mean_gate: float  # mean of ḡ over the experts


@dataclass
class ExportReport:
    output: Path
    rank: int
    matrices: list[MatrixExport]
    info: dict[str, Any] = field(default_factory=dict)
    start: dict[str, LowRank] | None = field(default=None, repr=False)  # the SVD factors (not written)

    @property
    def max_rel_error(self) -> float:
        return max((m.rel_error for m in self.matrices), default=0.0)

    @property
    def mean_rel_error(self) -> float:
        return sum(m.rel_error for m in self.matrices) / max(len(self.matrices), 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "peft-lora",
            "output": str(self.output),
            "rank": self.rank,
            "max_rel_error": self.max_rel_error,
            "mean_rel_error": self.mean_rel_error,
            "matrices": [asdict(m) for m in self.matrices],
            **self.info,
        }


def base_model_copy(model: MoreModel) -> nn.Module:
    """A deep copy of the wrapped transformers model with every MoRE layer replaced by its base layer."""
    base = copy.deepcopy(model.base_model)
    for name in model.more_layers():
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        setattr(parent, child, getattr(parent, child).base_layer)
    return base


def static_factors(model: MoreModel, gates: dict[str, torch.Tensor], rank: int) -> dict[str, LowRank]:
    """Per MoRE matrix: the rank-``rank`` factors of ``lora_B · diag(ḡ) · lora_A``."""
    layers = model.more_layers()
    missing = sorted(set(layers) - set(gates))
    if missing:
        raise ValueError(f"gates: no ḡ for MoRE matrices {missing[:5]}")
    factors = {}
    for name, layer in layers.items():
        g = gates[name].to(device=layer.lora_B.device, dtype=torch.float64).flatten()
        if g.numel() != layer.num_experts:
            raise ValueError(f"gates[{name!r}] has {g.numel()} values; the matrix has {layer.num_experts} experts")
        factors[name] = low_rank_factors(layer.lora_B.double() * g, layer.lora_A.double(), rank)
    return factors


def check_output(
    output: str | os.PathLike, *, overwrite: bool = False, run_dir: str | os.PathLike | None = None
) -> None:
    """Refuse an export folder that would overwrite or mix into something else (before any slow work).

    Never inside a run folder (``run_dir``, or any folder with a SmartFed config.json above
    ``output``), nor inside the run's model or adapter folders; an existing non-empty
    ``output`` only with ``overwrite``, and then only a previous export (it is deleted).
    """
    from ..run.folder import RunFolder, enclosing_run_folder, is_within

    output = Path(output).expanduser()
    run = enclosing_run_folder(output)
    if run is None and run_dir is not None and is_within(output, run_dir):
        run = Path(run_dir)
    if run is not None:
        raise ValueError(f"--output {output} lies inside the run folder {run}; export to a folder outside it")
    if run_dir is not None:
        try:
            config = RunFolder(run_dir).read_config()
        except (OSError, ValueError):
            config = {}  # loading the run names the problem
        sources = [str(config.get("model_name_or_path") or "")]
        sources += [s.strip() for s in str(config.get("lora_pool") or "").split(",")]
        for source in sources:
            if source and Path(source).expanduser().exists() and is_within(output, source):
                raise ValueError(f"--output {output} lies inside {source}, a model or adapter the run uses")
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"export output {output} exists and is not a folder")
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise FileExistsError(f"export output {output} already exists (pass overwrite=True / --overwrite)")
        if not (output / REPORT_FILE).is_file():
            raise ValueError(
                f"--overwrite: {output} is not a SmartFed export (no {REPORT_FILE}); refusing to replace it"
            )


def _prepare_output(output: Path, overwrite: bool, run_dir: str | os.PathLike | None = None) -> None:
    check_output(output, overwrite=overwrite, run_dir=run_dir)


def _move_into_place(tmp: Path, output: Path) -> None:
    if not output.exists():
        os.replace(tmp, output)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".old", dir=output.parent))
    os.replace(output, old / output.name)
    os.replace(tmp, output)
    shutil.rmtree(old, ignore_errors=True)


def check_rank(model: MoreModel, rank: int) -> None:
    """Refuse a rank above every target matrix's own rank bound min(d_out, d_in).

    Beyond it every matrix is already exact and the rest is zero padding, whose
    (d_out + d_in) × rank floats a mistyped ``--rank`` would make unbounded.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} (--rank) must be a positive int")
    shapes = {name: min(layer.lora_B.shape[0], layer.lora_A.shape[1]) for name, layer in model.more_layers().items()}
    if not shapes:
        return
    name, largest = max(shapes.items(), key=lambda item: item[1])
    if rank > largest:
        raise ValueError(
            f"rank={rank} (--rank) exceeds the rank any target matrix can have: min(d_out, d_in) = {largest} "
            f"(e.g. {name}); use --rank <= {largest}"
        )


def check_output_parent(output: Path) -> None:
    """Refuse an output whose nearest existing ancestor is a file or not writable (before the slow part)."""
    ancestor = output.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"export output {output}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"export output {output}: the folder {ancestor} is not writable")


def static_peft_model(model: MoreModel, factors: dict[str, LowRank], rank: int) -> nn.Module:
    """A PEFT LoRA (``r = lora_alpha = rank``, exactly the MoRE matrices) on a copy of the base, holding ``factors``."""
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(factors),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", **_QUIET)
        peft_model = get_peft_model(base_model_copy(model), lora_config)
    set_lora_factors(peft_model, factors)
    return peft_model


@torch.no_grad()
def set_lora_factors(peft_model: nn.Module, factors: dict[str, LowRank]) -> None:
    """Copy ``factors`` into the active LoRA adapter of ``peft_model`` (module names as in the MoRE model)."""
    inner = peft_model.base_model.model
    for name, lr in factors.items():
        layer = inner.get_submodule(name)
        adapter = layer.active_adapters[0]
        layer.lora_A[adapter].weight.copy_(lr.A)
        layer.lora_B[adapter].weight.copy_(lr.B)


def _matrix_exports(
    model: MoreModel, factors: dict[str, LowRank], gates: dict[str, torch.Tensor], rank: int
) -> list[MatrixExport]:
    tol = torch.finfo(torch.float32).eps
    matrices = []
    for name, lr in factors.items():
        layer = model.more_layers()[name]
        s = lr.singular_values
        bound = s.max().item() * max(layer.lora_B.shape[0], layer.lora_A.shape[1]) * tol if s.numel() else 0.0
        matrices.append(
            MatrixExport(
                name=name,
                experts=layer.num_experts,
                rank=rank,
                mixture_rank=int((s > bound).sum()) if s.numel() and s.max() > 0 else 0,
                rel_error=lr.rel_error,
                mean_gate=float(gates[name].float().mean()),
            )
        )
    return matrices


def export_peft(
    model: MoreModel,
    output: str | os.PathLike,
    *,
    rank: int,
    gates: dict[str, torch.Tensor],
    overwrite: bool = False,
    info: dict[str, Any] | None = None,
    tune: Callable[[nn.Module], dict[str, Any]] | None = None,
) -> ExportReport:
    """Write the static rank-``rank`` PEFT LoRA adapter of ``model`` under gates ``gates`` into ``output``.

    ``gates``: ḡ per MoRE matrix, e.g. from ``mean_gates``. The adapter targets
    exactly the MoRE matrices, with ``r = lora_alpha = rank``. ``tune``, when given,
    is called on the PEFT model holding the SVD factors before it is saved (e.g.
    ``smartfed.serving.distill.distill``); what it returns is recorded in the report
    under ``"distill"``. ``output`` is written whole or not at all (temporary folder,
    then rename); an existing non-empty ``output`` is refused unless ``overwrite``.
    """
    output = Path(output).expanduser()
    _prepare_output(output, overwrite)
    check_rank(model, rank)
    factors = static_factors(model, gates, rank)
    peft_model = static_peft_model(model, factors, rank)
    report = ExportReport(
        output=output, rank=rank, matrices=_matrix_exports(model, factors, gates, rank), info=dict(info or {})
    )
    report.start = factors
    if tune is not None:
        report.info["distill"] = tune(peft_model)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_temp_dir(output)
    try:
        peft_model.save_pretrained(tmp)
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _move_into_place(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return report


def write_report(report: ExportReport) -> None:
    """Rewrite ``smartfed_export.json`` in the export folder (e.g. after adding scores), atomically."""
    from ..run.folder import atomic_write_json

    atomic_write_json(report.output / REPORT_FILE, report.to_dict())


def export_run(
    run_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    rank: int,
    calibration: int = 64,
    checkpoint: int | None = None,
    pool: Any = None,
    overwrite: bool = False,
    loaded: Any = None,
    distill: Any = None,
) -> tuple[Any, ExportReport]:
    """``smartfed.load(run_dir)``, ḡ over the first ``calibration`` training examples of the run's task, export.

    ``distill`` (a ``smartfed.serving.distill.DistillConfig``): train the SVD export to
    match the routed model on the run's training prompts before it is written.
    Returns ``(loaded, report)``; ``loaded`` (a ``smartfed.serving.inference.Loaded``) can
    be passed back in to skip loading.
    """
    from ..data import load_task
    from .distill import DistillConfig
    from .inference import load

    if isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 1:
        raise ValueError(f"calibration={calibration!r} must be a positive int")
    if distill is not None and not isinstance(distill, DistillConfig):
        raise TypeError(f"distill must be a DistillConfig or None, got {type(distill).__name__}")
    _prepare_output(Path(output).expanduser(), overwrite, run_dir)  # fail before the slow part
    if loaded is None:
        loaded = load(run_dir, checkpoint=checkpoint, pool=pool)
    if not isinstance(loaded.model, MoreModel):
        raise ValueError(f"run {loaded.run_dir}: method {loaded.config.method!r} has no MoRE layers to export")
    check_rank(loaded.model, rank)  # both before the calibration pass
    check_output_parent(Path(output).expanduser())
    config = loaded.config
    _, train, _ = load_task(config.task, seed=config.seed, num_train=config.num_train, num_test=config.num_test)
    rows = train.select(range(min(calibration, len(train))))
    batches = calibration_batches(loaded.tokenizer, rows["prompt"], rows["answer"], max_length=config.max_length)
    gates = mean_gates(loaded.model, batches)
    info = {
        "run_dir": str(loaded.run_dir),
        "round": loaded.round,
        "calibration_examples": len(rows),
        "calibration_task": config.task,
        "quotas": loaded.quotas,
    }
    tune = None if distill is None else _distiller(loaded, train, distill)
    return loaded, export_peft(loaded.model, output, rank=rank, gates=gates, overwrite=overwrite, info=info, tune=tune)


def _distiller(loaded: Any, train: Any, config: Any) -> Callable[[nn.Module], dict[str, Any]]:
    """The ``tune`` of ``export_peft`` that distils the routed model of ``loaded`` on ``train``'s prompts."""
    from ..eval import generate_answers
    from .distill import distill

    run = loaded.config
    rows = train.select(range(len(train) if config.examples == 0 else min(config.examples, len(train))))
    prompts = list(rows["prompt"])

    def tune(student: nn.Module) -> dict[str, Any]:
        if config.data == "generated":  # what the routed model writes: the tokens it will be served on
            answers = generate_answers(loaded.model, loaded.tokenizer, prompts, max_new_tokens=run.max_new_tokens)
        else:
            answers = list(rows["answer"])
        result = distill(student, loaded.model, loaded.tokenizer, prompts, answers, config, max_length=run.max_length)
        return {**result.to_dict(), "task": run.task, "max_length": run.max_length}

    return tune


def compare_scores(
    loaded: Any,
    adapter_dir: str | os.PathLike,
    *,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    include_base: bool = True,
    start: dict[str, LowRank] | None = None,
) -> dict[str, dict[str, Any]]:
    """Score the routed model, the exported adapter (and the bare base) on the run's held-out items.

    Returns ``{"routed": {"score", "n"}, "export": {...}, "base": {...}}`` with the
    task's metric; the same items, greedy, ``max_new_tokens`` (default: the run's).
    ``start``: the SVD factors a distilled export started from (``ExportReport.start``),
    scored too, as ``"svd"``, in the loaded adapter's place.
    """
    from peft import PeftModel

    from ..data import load_task
    from ..eval import evaluate_task

    config = loaded.config
    task, _, test = load_task(config.task, seed=config.seed, num_train=config.num_train, num_test=config.num_test)
    new_tokens = max_new_tokens or config.max_new_tokens
    kwargs = {"max_new_tokens": new_tokens, "batch_size": batch_size, "limit": limit}
    scores = {"routed": evaluate_task(loaded.model, loaded.tokenizer, task, test, **kwargs)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", **_QUIET)
        exported = PeftModel.from_pretrained(base_model_copy(loaded.model), str(adapter_dir)).eval()
    scores["export"] = evaluate_task(exported, loaded.tokenizer, task, test, **kwargs)
    if include_base:
        with exported.disable_adapter():
            scores["base"] = evaluate_task(exported, loaded.tokenizer, task, test, **kwargs)
    if start is not None:
        set_lora_factors(exported, start)
        scores["svd"] = evaluate_task(exported, loaded.tokenizer, task, test, **kwargs)
    return {name: {**s, "metric": task.metric} for name, s in scores.items()}
