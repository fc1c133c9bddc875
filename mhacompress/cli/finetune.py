"""`mhacompress finetune`: fine-tune an original or a reduced model on a GLUE task and save it."""

from __future__ import annotations

import click

from ._common import (
    FiniteFloat,
    ProgressBars,
    allow_pickle_option,
    console,
    device_option,
    emit_json,
    resolved_device,
    task_names,
    user_errors,
)
from .eval import data_options


@click.command()
@click.argument("model")
@click.option("--task", "-t", required=True, help=f"GLUE task: {task_names()}.")
@click.option("--output", "-o", required=True, help="Folder to write (atomically).")
@click.option("--force", is_flag=True, help="Replace a non-empty --output folder.")
@click.option("--epochs", type=FiniteFloat(min=0, max=1e6, min_open=True), default=3, show_default=True,  # EPOCHS_MAX
              help="Passes over the train split (a fraction is allowed), at most 1e6.")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=2e-5, show_default=True,
              help="Peak learning rate of AdamW.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-length", type=click.IntRange(min=8), default=128, show_default=True)
@click.option("--warmup", type=FiniteFloat(0, 1), default=0.1, show_default=True,
              help="Fraction of steps of linear warm-up (then linear decay to 0).")
@click.option("--weight-decay", type=FiniteFloat(min=0), default=0.01, show_default=True,
              help="AdamW's decoupled decay; times --lr it must stay below 1.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed of the head, data order and dropout.")
@click.option("--limit", type=click.IntRange(min=1), help="Train on a seeded random sample of N examples.")
@data_options
@device_option("Where to train")
@click.option("--eval/--no-eval", "do_eval", default=True, show_default=True,
              help="Score the result on the task's dev split.")
@allow_pickle_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of text.")
def finetune(model, task, output, force, epochs, lr, batch_size, max_length, warmup, weight_decay, seed, limit,
             data_dir, device, do_eval, allow_pickle, as_json):
    """Fine-tune MODEL on TASK's train split and save it to OUTPUT.

    A plain encoder gets a fresh sequence-classification head (one regression output for stsb). A reduced model
    keeps its collaborative attention layers, trained along with the rest, and is saved as a reduced folder.

    \b
    Examples:
      mhacompress finetune minilm --task mrpc --output out/minilm-mrpc --epochs 3 --lr 5e-5
      mhacompress finetune out/minilm-mrpc-cp96 --task mrpc --output out/minilm-mrpc-cp96-ft --limit 500 --epochs 1
    """
    with user_errors():
        device = resolved_device(device)
        from ..commands import finetune as train

        with ProgressBars(not as_json) as bars:
            result = train(model, task, output, force=force, epochs=epochs, lr=lr, batch_size=batch_size,
                           max_length=max_length, warmup=warmup, weight_decay=weight_decay, seed=seed, limit=limit,
                           data_dir=data_dir, device=device, evaluate=do_eval, allow_pickle=allow_pickle,
                           on_progress=bars)
    if as_json:
        emit_json(result, "finetune", device)
        return
    out = console()
    out.print(f"{result['task']}: {result['steps']} steps on {result['examples']:,} examples, loss "
              f"{result['loss']['first']:.3f} -> {result['loss']['last']:.3f}; {result['seconds']:.1f} s")
    if "skipped" in result.get("eval", {}):
        out.print(f"not evaluated: {result['eval']['skipped']}")
    for name, value in result.get("eval", {}).get("metrics", {}).items():
        out.print(f"dev {name}: {value:.4f}")
    out.print(f"saved to {result['output']}")

