"""Using a finished run: ``generate``, ``eval``, ``export``.

The work is done in ``smartfed.serving`` (``inference``, ``evaluate``, ``export``,
``distill``); these commands parse the options, call it and print what it did.
``export`` takes one ``--distill_<field>`` option per field of ``DistillConfig``
(``cli.options``, ``overrides=True``: only the options given are passed on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from ..serving.distill import DistillConfig
from .common import (
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    Load4Opt,
    Load8Opt,
    Placement,
    PoolOpt,
    RoundOpt,
    RunDirArg,
    error_exit,
    load_run,
)
from .options import add_dataclass_options


def generate_command(
    run_dir: RunDirArg,
    prompt: Annotated[
        str, typer.Option("--prompt", help="The prompt (the chat template is applied when the tokenizer has one).")
    ],
    max_new_tokens: Annotated[int, typer.Option("--max_new_tokens", min=1, help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy; > 0 samples.")] = 0.0,
    round_: RoundOpt = None,
    pool: PoolOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    load_in_4bit: Load4Opt = None,
    load_in_8bit: Load8Opt = None,
    debug: DebugOpt = False,
) -> None:
    """Answer one prompt with a finished run's routed model, streaming tokens to the terminal."""
    import torch
    from transformers import TextStreamer

    from ..data.collate import encode_prompt, pad_token_id

    if not prompt.strip():  # checked before the model loads: nothing to answer
        raise ValueError("--prompt is empty: give the text to answer")
    model, tokenizer = load_run(run_dir, round_, pool, debug, Placement(device, dtype, load_in_4bit, load_in_8bit))
    ids = encode_prompt(tokenizer, prompt)
    if not ids:
        raise ValueError(f"--prompt {prompt[:40]!r} encodes to no tokens with the run's tokenizer")
    input_ids = torch.tensor([ids], dtype=torch.long).to(next(model.parameters()).device)
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    )
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            num_beams=1,
            pad_token_id=pad_token_id(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            streamer=streamer,
            **sampling,
        )


def eval_command(
    run_dir: RunDirArg,
    task: Annotated[
        Optional[str],
        typer.Option("--task", help="Registered task name or Alpaca-style JSONL file (default: the run's task)."),
    ] = None,
    limit: Annotated[
        Optional[int], typer.Option("--limit", min=1, help="Score only the first N held-out items.")
    ] = None,
    max_new_tokens: Annotated[
        Optional[int], typer.Option("--max_new_tokens", min=1, help="Tokens per answer (default: the run's).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch_size", min=1, help="Prompts per generate call.")] = 16,
    round_: RoundOpt = None,
    pool: PoolOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    load_in_4bit: Load4Opt = None,
    load_in_8bit: Load8Opt = None,
    debug: DebugOpt = False,
) -> None:
    """Score a finished run on the held-out split of a task; writes eval/<task>/ in the run folder."""
    from ..serving.evaluate import evaluate_run

    loaded = load_run(run_dir, round_, pool, debug, Placement(device, dtype, load_in_4bit, load_in_8bit))
    try:
        result = evaluate_run(loaded, task, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size)
    except (FileNotFoundError, ValueError) as err:  # a task that does not load: file and line named
        error_exit(err, debug)
    typer.echo(f"{result.task}: {result.metric} {result.score:.4f} on {result.n} held-out items (round {result.round})")
    typer.echo(f"wrote {result.predictions_file} and {result.scores_file}")


def export_command(
    run_dir: RunDirArg,
    output: Annotated[Path, typer.Option("--output", help="Folder to write the adapter to.", show_default=False)],
    rank: Annotated[int, typer.Option("--rank", min=1, help="LoRA rank R of the export (truncated SVD per matrix).")],
    to: Annotated[str, typer.Option("--to", help="Export format; 'peft' (a PEFT LoRA adapter).")] = "peft",
    calibration: Annotated[
        int, typer.Option("--calibration", min=1, help="Training examples of the run's task to average the gates over.")
    ] = 64,
    limit: Annotated[
        Optional[int], typer.Option("--limit", min=1, help="Held-out items to score both models on (default: all).")
    ] = None,
    max_new_tokens: Annotated[
        Optional[int],
        typer.Option("--max_new_tokens", min=1, help="Tokens per answer when scoring (default: the run's)."),
    ] = None,
    no_eval: Annotated[bool, typer.Option("--no_eval", help="Only write the adapter; do not score it.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --output folder.")] = False,
    distill: Annotated[
        bool,
        typer.Option(
            "--distill",
            help="Train the SVD export to match the routed model on the run's training prompts "
            "(the --distill_* options; defaults measured in results/export).",
        ),
    ] = False,
    round_: RoundOpt = None,
    pool: PoolOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    load_in_4bit: Load4Opt = None,
    load_in_8bit: Load8Opt = None,
    debug: DebugOpt = False,
    **distill_options: Any,
) -> None:
    """Export the routed mixture of a finished run as a static PEFT LoRA adapter of rank R, and score what it costs."""
    from ..serving.export import check_output, compare_scores, export_run, write_report

    if to != "peft":
        error_exit(f"--to {to!r}: the only export format is 'peft'")
    distill_config = _distill_config(distill, distill_options, debug)
    try:  # not into a run folder, the model's folder, or over anything but an earlier export
        check_output(output, overwrite=overwrite, run_dir=run_dir)
    except (FileExistsError, ValueError) as err:
        error_exit(err, debug)
    loaded = load_run(run_dir, round_, pool, debug, Placement(device, dtype, load_in_4bit, load_in_8bit))
    try:
        loaded, report = export_run(
            run_dir,
            output,
            rank=rank,
            calibration=calibration,
            overwrite=overwrite,
            loaded=loaded,
            distill=distill_config,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        error_exit(err, debug)
    exact = sum(m.rel_error < 1e-6 for m in report.matrices)
    padded = sum(m.experts < rank for m in report.matrices)
    typer.echo(
        f"wrote a PEFT LoRA adapter (r = lora_alpha = {rank}, {len(report.matrices)} matrices) to {report.output}"
    )
    typer.echo(
        f"gates: mean over {report.info['calibration_examples']} training examples; relative truncation error "
        f"max {report.max_rel_error:.4f}, mean {report.mean_rel_error:.4f}; exact for {exact}/{len(report.matrices)} matrices"
        + (f"; {padded} matrices have fewer than {rank} experts (zero-padded)" if padded else "")
    )
    if distill_config is not None:
        d = report.info["distill"]
        typer.echo(
            f"distilled: {d['steps']} steps of {d['loss']} on {d['examples']} training prompts ({d['data']} answers); "
            f"KL to the routed model {d['kl_before']:.4f} -> {d['kl_after']:.4f} ({d['seconds']:.0f} s)"
        )
    if no_eval:
        return
    start = report.start if distill_config is not None else None
    scores = compare_scores(loaded, report.output, limit=limit, max_new_tokens=max_new_tokens, start=start)
    table = Table(title=f"held-out {loaded.config.task} ({scores['routed']['metric']})", caption="greedy, same items")
    for column in ("model", "score", "n"):
        table.add_column(column)
    labels = {
        "base": "base model (no adapter)",
        "routed": f"routed MoRE (round {loaded.round})",
        "svd": f"static PEFT LoRA r={rank} (SVD, the start)",
        "export": f"static PEFT LoRA r={rank}" + (" (distilled)" if distill_config is not None else ""),
    }
    for key in ("base", "routed", "svd", "export"):
        if key in scores:
            table.add_row(labels[key], f"{scores[key]['score']:.4f}", str(int(scores[key]["n"])))
    Console().print(table)
    routed = scores["routed"]["score"]
    share = f"{scores['export']['score'] / routed:.1%}" if routed > 0 else "n/a (the routed model scores 0)"
    typer.echo(f"share of the routed score kept by the export: {share}")
    report.info["scores"] = scores
    write_report(report)


def _distill_config(distill: bool, options: dict[str, Any], debug: bool) -> Any:
    """The ``DistillConfig`` of ``--distill`` and the ``--distill_*`` options given (None without ``--distill``)."""
    given = {name.removeprefix("distill_"): value for name, value in options.items() if value is not None}
    if not distill:
        if given:
            error_exit(f"--distill_{next(iter(given))} needs --distill", debug)
        return None
    try:
        return DistillConfig(**given)
    except ValueError as err:
        error_exit(err, debug)


add_dataclass_options(export_command, DistillConfig, overrides=True, prefix="distill_", show_field_defaults=True)
