"""`yxanul policy`: which precision every module computes in, and the parameter distribution."""
from __future__ import annotations

from ._common import add_model_policy_args, human_bytes, print_json, table


def register(sub):
    p = sub.add_parser("policy", help="show the resolved precision of every module")
    add_model_policy_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args):
    import torch

    from ..config import load_model_config
    from ..model import Yxanul
    from ..precision import distribution, load_policy

    cfg = load_model_config(args.model)
    pol = load_policy(args.config, strict=False if args.lax else None)
    with torch.device("meta"):
        model = Yxanul(cfg)
    mods = pol.resolve(model)
    dist = distribution(mods)
    if args.json:
        print_json({**dist, "modules": [{"name": m.name, "precision": m.precision, "params": m.params} for m in mods]})
        return 0
    master = pol.dtype_of("master_weights")
    rows = []
    for m in mods:
        gran = pol.recipe.granularity() if m.precision.startswith("fp8") else "-"
        rows.append([m.name, m.kind, m.precision, master if m.params else "(tied)", gran, f"{m.params:,}", m.rule])
    print(table(rows, ["module", "type", "compute", "storage", "scaling", "params", "rule"], "lllllrl"))
    print()
    print(f"Precision distribution ({cfg.name}, {dist['total_params']:,} params, policy {pol.source}, "
          f"recipe {pol.recipe.name})")
    for k, d in dist["by_precision"].items():
        print(f"- {k.upper():9s} {d['params']:>13,} params ({d['percent']:6.2f}%)  {human_bytes(d['bytes'])} at compute dtype")
    rt = pol.runtime_components()
    if rt:
        print("Runtime components: " + ", ".join(f"{n} -> {p}" for n, p in rt))
    print(f"Optimizer states {pol.dtype_of('optimizer_dtype')}, master weights {master}, "
          f"gradient accumulation {pol.dtype_of('gradient_accumulation')}")
    return 0
