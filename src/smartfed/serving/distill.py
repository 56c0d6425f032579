"""Distil a routed MoRE model into the static LoRA of its export (``smartfed export --to peft --distill``).

The SVD export (``smartfed.serving.export``) replaces the per-token gates of the
routed update ``Δy = Σ_m g_m(x) s_m B_m (A_m x)`` (SmartFed, Wu et al., 2025) by
their calibration mean ``ḡ`` and so throws the routing away. Distillation
starts from that rank-R adapter and trains its ``lora_A``/``lora_B`` (PEFT, the
same target matrices, the rest frozen) so that the static model's next-token
distributions match the routed model's ("teacher") on the answer tokens of the
run's own training prompts:

* ``loss="kl"``: ``KL(p_routed ‖ p_static)`` per answer token (Hinton et al., 2015,
  at temperature 1), averaged over the answer tokens of a batch;
* ``loss="ce"``: cross-entropy of the static model on the answer tokens, i.e. with
  ``data="generated"`` the routed model's own greedy answers as targets
  (sequence-level distillation, Kim & Rush, 2016);
* ``loss="kl_ce"``: their sum.

``data="generated"`` uses the routed model's greedy answers to the training
prompts as the answer tokens (what it will write at serving time);
``data="answers"`` the training items' reference answers.

The KL to the routed model is measured before and after on the first
``eval_examples`` distillation examples (the same tokens both times) and goes
into the export's report, with the settings.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data.collate import IGNORE_INDEX, batches, encode_examples

DistillLoss = Literal["kl", "ce", "kl_ce"]
DistillData = Literal["generated", "answers"]


def _where(name: str) -> str:
    """How an error names a field: the dataclass field and its command-line flag."""
    return f"DistillConfig.{name} (--distill_{name})"


def _positive_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{_where(name)}={value!r} must be an int >= {minimum}")


@dataclass
class DistillConfig:
    """How the static export is trained to match the routed model (module docstring).

    The defaults are a starting point not yet confirmed by measurement; results/export/README.md
    records what was measured on json_math at R = 16 (the routed run of the default benchmark, seed 0).
    """

    steps: int = field(default=60, metadata={"help": "Distillation steps (AdamW) from the SVD export."})
    learning_rate: float = field(
        default=1e-3, metadata={"help": "AdamW learning rate of lora_A/lora_B, linear decay to 0."}
    )
    loss: DistillLoss = field(
        default="kl",
        metadata={
            "help": "'kl': KL(routed ‖ static) of the next-token distributions on the answer tokens; "
            "'ce': cross-entropy on the answer tokens (the routed model's greedy answers with data=generated); "
            "'kl_ce': both."
        },
    )
    data: DistillData = field(
        default="generated",
        metadata={
            "help": "Answer tokens: 'generated' = the routed model's greedy answers to the run's training prompts, "
            "'answers' = the training items' reference answers."
        },
    )
    examples: int = field(
        default=96, metadata={"help": "First training prompts of the run's task to distil on (0: all the run's)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Examples per distillation step."})
    eval_examples: int = field(
        default=32, metadata={"help": "Examples the KL to the routed model is measured on, before and after."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    seed: int = field(default=0, metadata={"help": "Seed of the batch order."})

    def __post_init__(self) -> None:
        _positive_int("steps", self.steps, 0)
        _positive_int("examples", self.examples, 0)
        _positive_int("batch_size", self.batch_size)
        _positive_int("eval_examples", self.eval_examples)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"{_where('seed')}={self.seed!r} must be an int")
        for name in ("learning_rate", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{_where(name)}={value!r} must be a finite number")
        if not self.learning_rate > 0:
            raise ValueError(f"{_where('learning_rate')}={self.learning_rate!r} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"{_where('weight_decay')}={self.weight_decay!r} must be >= 0")
        for name, kind in (("loss", DistillLoss), ("data", DistillData)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"{_where(name)}={getattr(self, name)!r} is not one of {list(get_args(kind))}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def answer_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over answer tokens of ``KL(p_teacher ‖ p_student)`` of the distributions that predict them.

    ``labels`` (batch, length) mark the answer tokens (``-100`` elsewhere); the
    logits at position i predict token i + 1, as in the causal-LM loss.
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    if not mask.any():
        raise ValueError("answer_kl: the batch has no answer tokens")
    student = F.log_softmax(student_logits[:, :-1][mask].float(), dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1][mask].float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def answer_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (the causal-LM loss)."""
    return F.cross_entropy(
        student_logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = _device(model)
    return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits


def distill_loss(
    student: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor], loss: DistillLoss
) -> torch.Tensor:
    """The ``loss`` of the student on one ``encode_examples`` batch (the teacher runs without gradients)."""
    logits = _forward(student, batch)
    labels = batch["labels"].to(logits.device)
    total = logits.new_zeros((), dtype=torch.float32)
    if loss in ("kl", "kl_ce"):
        with torch.no_grad():
            target = _forward(teacher, batch).to(logits.device)
        total = total + answer_kl(logits, target, labels)
    if loss in ("ce", "kl_ce"):
        total = total + answer_ce(logits, labels)
    return total


@torch.no_grad()
def mean_kl(student: nn.Module, teacher: nn.Module, batch_list: Iterable[dict[str, torch.Tensor]]) -> float:
    """``KL(p_teacher ‖ p_student)`` averaged over every answer token of ``batch_list`` (both in eval mode)."""
    was = student.training, teacher.training
    student.eval()
    teacher.eval()
    total, tokens = 0.0, 0
    try:
        for batch in batch_list:
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if n:
                logits = _forward(student, batch)
                target = _forward(teacher, batch).to(logits.device)
                total += float(answer_kl(logits, target, batch["labels"].to(logits.device))) * n
                tokens += n
    finally:
        student.train(was[0])
        teacher.train(was[1])
    if tokens == 0:
        raise ValueError("mean_kl: the batches hold no answer tokens")
    return total / tokens


def _eval_batches(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str], size: int, max_length: int
) -> list[dict[str, torch.Tensor]]:
    return [
        encode_examples(tokenizer, prompts[i : i + size], answers[i : i + size], max_length=max_length)
        for i in range(0, len(prompts), size)
    ]


@dataclass
class DistillResult:
    """What the distillation did: the settings and the KL to the routed model before and after."""

    config: DistillConfig
    examples: int  # distillation examples used
    kl_before: float  # mean KL(routed ‖ static) on the eval examples' answer tokens, at the SVD start
    kl_after: float
    loss_first: float | None  # the training loss of the first and the last step
    loss_last: float | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(data.pop("config"))
        return data


def distill(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    config: DistillConfig,
    *,
    max_length: int = 128,
) -> DistillResult:
    """Train ``student``'s trainable parameters (a PeftModel's LoRA) to match ``teacher`` on ``prompts``/``answers``.

    ``answers`` are the answer tokens' text (the routed model's greedy answers for
    ``data="generated"``); ``config.steps`` AdamW steps with a linearly decaying
    rate over batches drawn by ``config.seed``. The student ends in eval mode.
    """
    if len(prompts) != len(answers) or not prompts:
        raise ValueError(f"distill: {len(prompts)} prompts and {len(answers)} answers (need as many, >= 1)")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("distill: the student has no trainable parameters")
    n_eval = min(config.eval_examples, len(prompts))
    held = _eval_batches(tokenizer, prompts[:n_eval], answers[:n_eval], config.batch_size, max_length)
    start = time.perf_counter()
    kl_before = mean_kl(student, teacher, held)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = max(config.steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    data = {"prompt": list(prompts), "answer": list(answers)}
    stream = batches(
        data, tokenizer, batch_size=config.batch_size, steps=config.steps, seed=config.seed, max_length=max_length
    )
    losses: list[float] = []
    student.train()
    teacher.eval()
    for batch in stream:
        loss = distill_loss(student, teacher, batch, config.loss)
        if not torch.isfinite(loss):
            raise ValueError(f"distill: the loss became {float(loss)} at step {len(losses) + 1}; lower --learning_rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    student.eval()
    kl_after = mean_kl(student, teacher, held)
    return DistillResult(
        config=config,
        examples=len(prompts),
        kl_before=kl_before,
        kl_after=kl_after,
        loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None,
        seconds=time.perf_counter() - start,
    )
