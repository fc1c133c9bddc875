"""The envelope every ``--json`` output carries, and the JSON Schema that describes all of them (schema.json, shipped
with the package). CI scripts can rely on ``schema_version``: within one version fields are only ever added."""

from __future__ import annotations

import math
from pathlib import Path

SCHEMA_VERSION = 1
SCHEMA_FILE = Path(__file__).with_name("schema.json")


def envelope(command: str, device: str | None = None) -> dict:
    """``{"schema_version", "command", "tool_version", "torch", "transformers", "device"}``."""
    import torch
    import transformers

    from . import __version__

    return {"schema_version": SCHEMA_VERSION, "command": command, "tool_version": __version__,
            "torch": torch.__version__, "transformers": transformers.__version__, "device": str(device or "cpu")}


def strict(obj):
    """``obj`` as strict JSON can carry it: NaN and infinities (an undefined metric, e.g. the correlation of constant
    predictions) become null, which every JSON parser reads; Python's default would write NaN, which jq and most
    others reject."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def validate(obj: dict) -> None:
    """Raise ``jsonschema.ValidationError`` when ``obj`` does not follow the schema (needs the jsonschema package)."""
    import json

    import jsonschema

    jsonschema.validate(obj, json.loads(SCHEMA_FILE.read_text()))
