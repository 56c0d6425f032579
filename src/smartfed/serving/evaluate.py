"""Score a finished run on the held-out split of a task, and write what it answered (``smartfed eval``).

``evaluate_run(loaded, task)`` loads the task with the run's seed and counts
(so the held-out items are the run's), answers them greedily with the loaded
model, scores every answer with the task's metric (record-aware: a pass@1
metric runs the programs) and writes, in ``<run>/eval/<task>/``:

* ``predictions.jsonl``: one ``{"prompt", "reference", "prediction", "score"}`` per item;
* ``scores.json``: ``task``, ``metric``, ``score`` (the mean), ``n``, ``round``,
  ``max_new_tokens``, ``seed``.

Both are written atomically; ``task_folder_name`` names the folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..data import TASKS, load_task, parse_real_spec
from ..eval import generate_answers
from ..eval.programs import per_example_scores
from ..run.folder import atomic_write_bytes, atomic_write_json
from .inference import Loaded

PREDICTIONS_FILE = "predictions.jsonl"
SCORES_FILE = "scores.json"


@dataclass(frozen=True)
class RunEvaluation:
    """What ``evaluate_run`` scored and where it wrote it.

    Attributes:
        task: the task as given (a registered name, a real dataset spec or a JSONL path).
        metric: the task's metric.
        score: the mean per-item score (0.0 when no item was scored).
        n: the number of items scored.
        round: the checkpoint round of the loaded model.
        max_new_tokens: tokens per answer.
        folder: ``<run>/eval/<task folder>``, holding ``predictions.jsonl`` and ``scores.json``.
    """

    task: str
    metric: str
    score: float
    n: int
    round: int
    max_new_tokens: int
    folder: Path

    @property
    def predictions_file(self) -> Path:
        """``predictions.jsonl``: one prompt, reference, prediction and score per line."""
        return self.folder / PREDICTIONS_FILE

    @property
    def scores_file(self) -> Path:
        """``scores.json``: the mean score and what it was computed with."""
        return self.folder / SCORES_FILE


def task_folder_name(task: str) -> str:
    """``arith`` → arith, ``gsm8k:/data/gsm8k`` → gsm8k, ``mgsm.es:...`` → mgsm.es, ``path/to/file.jsonl`` → file."""
    if task in TASKS:
        name = task
    elif parse_real_spec(task) is not None:
        name = task.split(":", 1)[0]
    else:
        name = Path(task).stem
    return re.sub(r"[^\w.-]+", "_", name) or "task"


def evaluate_run(
    loaded: Loaded,
    task: str | None = None,
    *,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
) -> RunEvaluation:
    """Score a loaded run on the held-out items of ``task`` and write ``predictions.jsonl`` and ``scores.json``.

    Args:
        loaded: the finished run, as ``smartfed.load`` returns it.
        task: a registered task, a real dataset spec or an Alpaca-style JSONL
            path (default: the run's task); loaded with the run's seed,
            ``num_train`` and ``num_test``.
        limit: score only the first ``limit`` held-out items (default: all).
        max_new_tokens: tokens per answer (default: the run's).
        batch_size: prompts per generate call.

    Raises:
        FileNotFoundError, ValueError: the task cannot be loaded (``load_task``'s
            errors, naming the file and line), or a file cannot be written.
    """
    config = loaded.config
    task_name = task or config.task
    spec, _, test = load_task(task_name, seed=config.seed, num_train=config.num_train, num_test=config.num_test)
    rows = test.select(range(min(limit, len(test)))) if limit else test
    prompts, refs = list(rows["prompt"]), list(rows["answer"])
    new_tokens = max_new_tokens or config.max_new_tokens
    preds = generate_answers(loaded.model, loaded.tokenizer, prompts, max_new_tokens=new_tokens, batch_size=batch_size)
    per_item = per_example_scores(spec.metric, preds, rows)  # record-aware: pass@1 runs the programs
    mean = sum(per_item) / len(per_item) if per_item else 0.0
    result = RunEvaluation(
        task=task_name,
        metric=spec.metric,
        score=mean,
        n=len(per_item),
        round=loaded.round,
        max_new_tokens=new_tokens,
        folder=loaded.run_dir / "eval" / task_folder_name(task_name),
    )
    lines = [
        json.dumps({"prompt": p, "reference": r, "prediction": y, "score": s}, ensure_ascii=False) + "\n"
        for p, r, y, s in zip(prompts, refs, preds, per_item, strict=True)
    ]
    atomic_write_bytes(result.predictions_file, "".join(lines).encode())
    atomic_write_json(
        result.scores_file,
        {
            "task": task_name,
            "metric": spec.metric,
            "score": mean,
            "n": len(per_item),
            "round": loaded.round,
            "max_new_tokens": new_tokens,
            "seed": config.seed,
        },
    )
    return result
