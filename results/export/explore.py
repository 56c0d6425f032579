"""Candidate distillation settings on one finished routed run: what chose the defaults of ``--distill``.

Usage: python results/export/explore.py RUN_DIR OUT_JSON [--rank 16] [--limit N] CANDIDATE ...
with CANDIDATE = ``loss=kl,learning_rate=5e-4,steps=100`` (fields of ``DistillConfig``).

Loads the run once, scores base, routed and the SVD export, then each candidate, every one
started from the same SVD factors and scored on the same held-out items; appends one JSON line
per model to OUT_JSON (resumable: a candidate already there is skipped).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from smartfed.data import load_task
from smartfed.eval import evaluate_task, generate_answers
from smartfed.serving.distill import DistillConfig, distill
from smartfed.serving.export import calibration_batches, mean_gates, set_lora_factors, static_factors, static_peft_model
from smartfed.serving.inference import load


def _parse(text: str) -> DistillConfig:
    values: dict[str, object] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        kind = type(getattr(DistillConfig(), key))
        values[key] = kind(float(value)) if kind in (int, float) else value
    return DistillConfig(**values)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("out")
    parser.add_argument("candidates", nargs="*")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--skip_base", action="store_true", help="Do not score the base model.")
    args = parser.parse_args()
    out = Path(args.out)
    done = {json.loads(line)["name"] for line in out.read_text().splitlines()} if out.exists() else set()
    loaded = load(args.run_dir)
    c = loaded.config
    task, train, test = load_task(c.task, seed=c.seed, num_train=c.num_train, num_test=c.num_test)
    kwargs = {"max_new_tokens": c.max_new_tokens, "limit": args.limit}

    def record(name: str, score: dict, **extra: object) -> None:
        line = {"name": name, "task": c.task, "rank": args.rank, "score": score["score"], "n": score["n"], **extra}
        print(json.dumps(line), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(line) + "\n")

    rows = train.select(range(64))
    gates = mean_gates(
        loaded.model, calibration_batches(loaded.tokenizer, rows["prompt"], rows["answer"], max_length=96)
    )
    factors = static_factors(loaded.model, gates, args.rank)
    student = static_peft_model(loaded.model, factors, args.rank)
    if "routed" not in done:
        record("routed", evaluate_task(loaded.model, loaded.tokenizer, task, test, **kwargs))
    if "svd" not in done:
        record("svd", evaluate_task(student.eval(), loaded.tokenizer, task, test, **kwargs))
    if "base" not in done and not args.skip_base:
        with student.disable_adapter():
            record("base", evaluate_task(student, loaded.tokenizer, task, test, **kwargs))
    cache = out.with_suffix(".generated.json")  # the routed model's greedy answers, first prompts first
    generated = json.loads(cache.read_text()) if cache.exists() else []
    for text in args.candidates:
        if text in done:
            continue
        config = _parse(text)
        prompts = list(train["prompt"][: config.examples or len(train)])
        if config.data == "generated" and len(generated) < len(prompts):
            rest = generate_answers(loaded.model, loaded.tokenizer, prompts[len(generated) :], max_new_tokens=16)
            generated += rest
            cache.write_text(json.dumps(generated))
        set_lora_factors(student, factors)
        answers = generated[: len(prompts)] if config.data == "generated" else list(train["answer"][: len(prompts)])
        start = time.perf_counter()
        result = distill(student, loaded.model, loaded.tokenizer, prompts, answers, config, max_length=c.max_length)
        score = evaluate_task(student, loaded.tokenizer, task, test, **kwargs)
        record(text, score, **result.to_dict(), wall=time.perf_counter() - start)


if __name__ == "__main__":
    main()
