"""`yxanul train`: train a model; with no arguments, `tiny` on the bundled public-domain corpus on CPU.

Every ``TrainConfig`` field is a flag (``batch_size`` -> ``--batch-size``; booleans get ``--X`` / ``--no-X``),
its help text and choices taken from the field's metadata. A flag left unset does not override the train
config YAML or the resumed checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import types
import typing
from pathlib import Path

from ..errors import YxanulError
from ..train_config import TrainConfig, load_train_config


def _base_type(hint) -> type:
    """int, float, str or bool from a field's type hint (``X | None`` -> X)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def _default_text(f: dataclasses.Field) -> str:
    if "shown_default" in f.metadata:
        return f.metadata["shown_default"]
    v = f.default
    if v is None or v == "":
        return "none"
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def add_config_flags(p: argparse.ArgumentParser) -> list[str]:
    """One flag per TrainConfig field, with its help and default; returns the field names (the flags' dests)."""
    hints = typing.get_type_hints(TrainConfig)
    names = []
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        help_text = f"{meta.get('help', '')} (default: {_default_text(f)})".lstrip().replace("%", "%%")
        kind = _base_type(hints[f.name])
        if kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            extra = {"choices": meta["choices"]} if "choices" in meta else {}
            if "metavar" in meta:
                extra["metavar"] = meta["metavar"]
            p.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text, **extra)
        names.append(f.name)
    return names


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (default: tiny on the bundled corpus, CPU)",
                       description="Train with the design note's mixed-precision strategy. With no arguments: the "
                                   "tiny preset on the bundled public-domain corpus, on CPU. Flags override "
                                   "--train-config, which overrides the built-in defaults.")
    p.add_argument("--train-config", metavar="YAML", help="train config YAML or preset name (configs/train)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue a run: a checkpoint folder, a run folder, or (bare) --out's latest checkpoint")
    p.add_argument("--restart", action="store_true",
                   help="start --out over when it holds a run that stopped before its first checkpoint")
    p.set_defaults(func=run, config_fields=add_config_flags(p))


def run(args: argparse.Namespace) -> int:
    # imported here, not at module level: they import torch, which the command line's start-up avoids
    from ..checkpoint.training import read_meta, resolve_checkpoint
    from ..config import dataclass_from_dict
    from ..distributed import destroy_distributed
    from ..train import Trainer

    overrides = {k: getattr(args, k) for k in args.config_fields if getattr(args, k, None) is not None}
    resume = None
    base = None
    if args.resume is not None:
        if args.resume:
            resume = args.resume
        elif args.out:
            resume = args.out
        else:
            raise YxanulError("bare --resume needs --out RUN_DIR (or pass --resume PATH)", source="--resume")
        ckpt = resolve_checkpoint(resume)
        run_dir = ckpt.parent.parent
        if args.out and Path(args.out).resolve() != run_dir.resolve():
            raise YxanulError(f"a resumed run goes on in its own folder ({run_dir}), not in another; drop --out",
                              key="--out")
        if args.restart:
            raise YxanulError("--resume continues a run and --restart starts one over: pass one of them",
                              source="--restart")
        meta = read_meta(ckpt, verify=False)  # the trainer verifies the files once
        # how the run is launched (--parallel) is not inherited: a checkpoint resumes in any mode
        # the recorded fields are type-checked like a YAML's and validated (with the flags given) below
        recorded = meta.get("train_config", {})
        unknown = sorted(str(k) for k in recorded if k not in TrainConfig.__dataclass_fields__) \
            if isinstance(recorded, dict) else []
        if unknown:   # settings of another version of the trainer: resumed without them, said so
            print(f"note: {ckpt / 'meta.json'}: train_config has settings this version does not know, ignored: "
                  f"{', '.join(unknown)}")
        base = dataclass_from_dict(TrainConfig, {k: v for k, v in recorded.items()
                                                 if k in TrainConfig.__dataclass_fields__ and k != "parallel"},
                                   source=str(ckpt / "meta.json"), prefix="train_config.")
        overrides.pop("out", None)
        resume = str(ckpt)
    cfg = load_train_config(args.train_config, overrides, base=base)
    recorded_policy = meta.get("policy") if resume is not None else None
    if "policy" not in overrides and isinstance(recorded_policy, dict) and isinstance(recorded_policy.get("settings"),
                                                                                      dict):
        # the layers a run converts to FP8 come from its policy file: an edit since the checkpoint is refused
        # unless asked for (checkpoints written before the record was kept are not checked)
        from ..precision import load_policy, policy_changes, policy_record
        current = policy_record(load_policy(cfg.policy))
        changed = policy_changes(recorded_policy, current)
        if changed:
            raise YxanulError(f"changed since the checkpoint was written ({', '.join(changed)}); restore it, or "
                              f"pass --config {shlex.quote(current['source'])} to resume with the edited policy",
                              source=current["source"])
    try:
        Trainer(cfg, resume=resume, restart=args.restart).fit()
    finally:
        if cfg.parallel != "none":
            destroy_distributed()
            args.exit_without_teardown = True  # see yxanul.cli.main
    return 0
