"""`mhacompress eval`: score a model (original, fine-tuned or reduced) on a GLUE task."""

from __future__ import annotations

import click

from ._common import (
    ProgressBars,
    allow_pickle_option,
    console,
    device_option,
    emit_json,
    first_token_option,
    interval_text,
    resolved_device,
    task_names,
    user_errors,
)


def data_options(f):
    """--data-dir, shared with `reduce --eval` and `finetune`."""
    return click.option("--data-dir", help="GLUE folder in the official glue_data layout (DIR/SST-2/dev.tsv, ...). "
                        "Default: $MHACOMPRESS_GLUE_DIR, else the nyu-mll/glue hub copy (needs network).")(f)


@click.command("eval")
@click.argument("model")
@click.option("--task", "-t", required=True, help=f"GLUE task: {task_names()}.")
@click.option("--split", default="validation", show_default=True, help="train, validation (alias dev) or test.")
@click.option("--limit", type=click.IntRange(min=1), help="Score only the first N examples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--max-length", type=click.IntRange(min=8), default=128, show_default=True,
              help="Truncate inputs to this many tokens.")
@device_option("Where to run the model")
@data_options
@click.option("--reference", help="Original model to compare with, label-free: prediction agreement and mean KL "
              "(classifiers), Pearson and mean absolute difference (regression heads), mean embedding cosine "
              "(encoders).")
@first_token_option("MODEL must be a reduced classifier.")
@allow_pickle_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of a table.")
def eval_(model, task, split, limit, batch_size, max_length, device, data_dir, reference, first_token_only,
          allow_pickle, as_json):
    """Score MODEL on a GLUE task with the task's official metrics (CoLA Matthews; SST-2, MNLI, QNLI, RTE, WNLI
    accuracy; MRPC, QQP F1 and accuracy; STS-B Pearson and Spearman).

    MODEL is a sequence-classification checkpoint (e.g. one made by `mhacompress finetune`), a reduced folder, or a
    plain sentence encoder, which is scored on stsb by cosine similarity of its sentence embeddings (pooled as its
    sentence-transformers folder says, else by the mean).

    \b
    Examples:
      mhacompress eval minilm --task stsb --data-dir ../glue_data
      mhacompress eval out/minilm-mrpc --task mrpc --json
      mhacompress eval out/minilm-mrpc-cp96 --task mrpc --reference out/minilm-mrpc
    """
    with user_errors():
        device = resolved_device(device)
        from ..commands import evaluate

        with ProgressBars(not as_json) as bars:
            result = evaluate(model, task, split=split, data_dir=data_dir, limit=limit, batch_size=batch_size,
                              max_length=max_length, device=device, reference=reference,
                              first_token_only=first_token_only, allow_pickle=allow_pickle, on_progress=bars)
    if as_json:
        emit_json(result, "eval", device)
    else:
        render(result)


def render(result: dict) -> None:
    from rich.table import Table

    out = console()
    out.print(f"{result['model']} on {result['task']} [{result['split']}]: {result['examples']:,} examples")
    table = Table()
    table.add_column("metric")
    table.add_column(result["model"], justify="right")
    ref = result.get("reference")
    if ref:
        table.add_column(ref["model"] + " (reference)", justify="right")
    for name, value in result["metrics"].items():
        row = [name, f"{value:.4f}"]
        if ref:
            row.append(f"{ref['metrics'][name]:.4f}")
        table.add_row(*row)
    if result["metrics"]:
        out.print(table)
    else:
        out.print("no metrics: the split has no labels, or an encoder was compared on a classification task")
    if ref and "drop" in ref:
        main = next(iter(result["metrics"]))  # the task's main metric comes first
        out.print(f"drop in {main} from the reference: {ref['drop']:+.4f}{_spread(ref.get('interval'))}")
    for name, value in result.get("fidelity", {}).items():
        out.print(f"fidelity {name}: {value:.4f}")
    out.print(f"{result['seconds']:.1f} s")


# ---- what `reduce --eval TASK --max-drop X` prints and gates on -----------------------------------------------


def render_eval(block: dict) -> None:
    console().print(f"{block['task']} {block['metric']}: original {block['original']:.4f}, reduced "
                    f"{block['reduced']:.4f}, drop {block['drop']:+.4f}{_spread(block.get('interval'))}")


def _spread(interval: list[float] | None) -> str:
    """A drop's 95% bootstrap interval, in brackets after the drop."""
    return f", 95% interval {interval_text(interval)}" if interval else ""


def check_drop(result: dict) -> None:
    """Exit 1 (one line on stderr) when the gate of --max-drop failed (eval.passed is False: compress decides it)."""
    block = result.get("eval")
    if not block or block.get("passed", True):
        return
    max_drop = block["max_drop"]
    if block["drop"] != block["drop"]:  # nan: every comparison with it is False
        raise click.ClickException(f"the {block['metric']} on {block['task']} is undefined (nan: constant predictions "
                                   f"or labels), so --max-drop {max_drop} cannot be checked; evaluate on more "
                                   f"examples or check the reduced model")
    raise click.ClickException(f"the reduced model loses {block['drop']:.4f} {block['metric']} on "
                               f"{block['task']}, more than --max-drop {max_drop}")
