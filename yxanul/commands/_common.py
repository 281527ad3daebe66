"""Helpers shared by subcommands: model/policy arguments, tables, JSON output."""
from __future__ import annotations

import json
import sys

from ..fmt import human_bytes, table  # noqa: F401  (re-exported for the subcommands)


def add_model_policy_args(p, model_default="yxanul-197m"):
    from ..config import list_presets
    p.add_argument("--model", default=model_default, help=f"preset name ({', '.join(list_presets())}) or YAML")
    p.add_argument("--config", default=None, help="precision policy YAML (default: configs/mixed_precision_config.yaml)")
    p.add_argument("--lax", action="store_true", help="warn (instead of failing) on patterns that match nothing")


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
