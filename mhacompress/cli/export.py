"""`mhacompress export`: a reduced model as an ONNX file, checked in onnxruntime before it is written."""

from __future__ import annotations

import click

from ._common import ProgressBars, console, emit_json, first_token_option, user_errors


@click.command()
@click.argument("directory", metavar="DIR")
@click.option("--format", "fmt", default="onnx", show_default=True, help="Output format (only onnx; any case).")
@click.option("--output", "-o", required=True, help="File to write.")
@click.option("--force", is_flag=True, help="Replace an existing --output file.")
@click.option("--opset", type=click.IntRange(17), default=18, show_default=True, help="ONNX opset.")
@click.option("--tolerance", type=float, default=1e-4, show_default=True,
              help="Largest |onnxruntime - PyTorch| accepted on the padded check batches.")
@first_token_option("The exported graph keeps it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of text.")
def export(directory, fmt, output, force, opset, tolerance, first_token_only, as_json):
    """Export the reduced model in DIR (written by `mhacompress reduce`) to a file that runs without PyTorch.

    The graph takes input_ids and attention_mask with dynamic batch and sequence axes and returns logits
    (classifiers) or last_hidden_state and, where the model has a pooler, pooler_output (encoders). Before the file
    is written it is run in onnxruntime on padded batches of several shapes and compared with PyTorch; a file that
    fails or cannot be checked is never written.

    \b
    Examples:
      mhacompress export out/minilm-cp96 --output out/minilm-cp96.onnx
      mhacompress export out/sst2-cp192 -o sst2.onnx --first-token-only --json
    """
    with user_errors():
        from ..commands import to_onnx

        with ProgressBars(not as_json) as bars:
            result = to_onnx(directory, output, fmt=fmt, force=force, opset=opset, tolerance=tolerance,
                             first_token_only=first_token_only, on_progress=bars)
    if as_json:
        emit_json(result, "export", None)
    else:
        render(result)


def render(result: dict) -> None:
    out = console()
    for r in result["runs"]:
        out.print(f"checked {r['output']:>17} on a padded batch {r['batch_size']} x {r['seq_len']}: "
                  f"max |onnxruntime - torch| = {r['max_abs_diff']:.1e}")
    out.print(f"[green]passed[/green] (<= {result['tolerance']:g}); wrote {result['output']} "
              f"({result['bytes'] / 2**20:.1f} MiB, opset {result['opset']}, dynamic batch and sequence axes)")
