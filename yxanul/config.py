"""Configuration: model presets and YAML loading with validation.

Every loader raises :class:`YxanulError` naming the file and key on bad input.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import YxanulError, brief, first_line

MAX_YAML_BYTES = 16 * 1024 * 1024   # config files are small; a larger one is refused before parsing


class _NoAliasLoader(yaml.SafeLoader):
    """The safe loader without aliases: ``*name`` could expand a small document into a huge structure."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not supported; write the "
                                                          "value out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        # a key given twice would silently keep the last value: say which
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if key_node.value in seen:
                        raise yaml.constructor.ConstructorError(None, None, f"key {key_node.value!r} appears twice",
                                                                key_node.start_mark)
                    seen.add(key_node.value)
        return super().construct_mapping(node, deep)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PRESET_DIR = CONFIG_DIR / "models"
DEFAULT_POLICY = CONFIG_DIR / "mixed_precision_config.yaml"


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; malformed YAML or a non-mapping top level is a YxanulError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:  # at most the limit + 1 bytes: a device or a pipe may never end
            raw = f.read(MAX_YAML_BYTES + 1)
        if len(raw) > MAX_YAML_BYTES:
            raise YxanulError(f"larger than {MAX_YAML_BYTES // (1024 * 1024)} MiB; not a config file",
                              source=str(path))
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise YxanulError("file not found", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise YxanulError(f"cannot read: {e}", source=str(path)) from None
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise YxanulError(f"malformed YAML{where}: {problem}", source=str(path)) from None
    except RecursionError:
        raise YxanulError("malformed YAML: nested too deeply", source=str(path)) from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts; drop the advice to raise it
        raise YxanulError(f"malformed YAML: {first_line(e).split(';')[0]}", source=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise YxanulError(f"top level must be a mapping, got {type(data).__name__}", source=str(path))
    return data


def _coerce(value: Any, typ: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], source, key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise YxanulError(f"expected true/false, got {brief(value)}", source=source, key=key)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise YxanulError(f"expected an integer, got {brief(value)}", source=source, key=key)
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise YxanulError(f"expected a number, got {brief(value)}", source=source, key=key)
        try:
            return float(value)
        except OverflowError:
            raise YxanulError(f"out of range: {brief(value)}", source=source, key=key) from None
    if typ is str:
        if not isinstance(value, str):
            raise YxanulError(f"expected a string, got {brief(value)}", source=source, key=key)
        return value
    return value


def dataclass_from_dict(cls, data: dict, source: str, prefix: str = "", base=None):
    """Build dataclass `cls` from `data` (over `base` if given), rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    kwargs = dataclasses.asdict(base) if base is not None else {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise YxanulError(f"unknown key (expected one of: {', '.join(sorted(names))})", source=source, key=key)
        kwargs[k] = _coerce(v, hints[k], source, key)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise YxanulError(f"incomplete config: {e}", source=source) from None


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 200005
    d_model: int = 768
    n_layers: int = 28
    n_heads: int = 12
    n_kv_heads: int = 2
    head_dim: int = 64
    ffn_hidden: int = 2048
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    embed_rank: int = 128  # 0: full vocab x d_model embedding
    tie_embeddings: bool = True
    init_std: float = 0.02
    # q/k/v and gate/up each as one GEMM (compute only: parameters, checkpoints and the policy keep the separate
    # layers; yxanul.model.fusion_kind says which precisions fuse); false runs every projection on its own
    fused_projections: bool = True
    name: str = "custom"

    def validate(self, source: str = "model config") -> "ModelConfig":
        for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "max_seq_len"):
            if getattr(self, k) <= 0:
                raise YxanulError(f"must be positive, got {getattr(self, k)}", source=source, key=k)
            # token ids are stored as uint32; a model deeper than MAX_LAYERS is not what this toolkit trains
            limit = 2 ** 32 if k == "vocab_size" else MAX_LAYERS if k == "n_layers" else 2 ** 24
            if getattr(self, k) > limit:
                raise YxanulError(f"must be <= {limit}, got {getattr(self, k)}", source=source, key=k)
        if self.n_heads % self.n_kv_heads:
            raise YxanulError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})",
                              source=source, key="n_kv_heads")
        if self.head_dim % 2:
            raise YxanulError("must be even for RoPE", source=source, key="head_dim")
        if not 0 <= self.embed_rank <= 2 ** 24:
            raise YxanulError(f"must be in [0, {2 ** 24}], got {brief(self.embed_rank)}", source=source,
                              key="embed_rank")
        if not all(math.isfinite(v) and v > 0 for v in (self.norm_eps, self.init_std, self.rope_theta)):
            raise YxanulError("norm_eps, init_std and rope_theta must be positive", source=source)
        return self


MAX_LAYERS = 1024  # a model config's n_layers (the presets have 4 to 28)
# fields that say how the layers compute, not what the model is (its weights and its function)
COMPUTE_ONLY_FIELDS = ("name", "fused_projections")


def model_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """The fields in which two model configs describe different models (:data:`COMPUTE_ONLY_FIELDS` aside)."""
    return [f.name for f in fields(a) if f.name not in COMPUTE_ONLY_FIELDS and getattr(a, f.name) != getattr(b, f.name)]


def is_model_file(spec: str | Path) -> bool:
    """Whether a ``--model`` value names a YAML file rather than a preset."""
    path = Path(spec)
    return path.suffix in (".yaml", ".yml") or path.exists()


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_model_config(spec: str | Path, overrides: dict | None = None, _seen: tuple = ()) -> ModelConfig:
    """`spec` is a preset name (see configs/models) or a YAML path.

    A YAML file may name a preset to start from with `preset: NAME` and override fields one by one.
    """
    spec = str(spec)
    path = Path(spec)
    if is_model_file(path):
        data = load_yaml(path)
        source = str(path)
        name = path.stem
    else:
        if spec not in list_presets():
            raise YxanulError(f"unknown model preset (known: {', '.join(list_presets())}; or pass a YAML path)",
                              source="--model", key=spec)
        data = load_yaml(PRESET_DIR / f"{spec}.yaml")
        source = str(PRESET_DIR / f"{spec}.yaml")
        name = spec
    base = None
    if "preset" in data:
        preset = data.pop("preset")
        if not isinstance(preset, str):
            raise YxanulError("expected a preset name", source=source, key="preset")
        if preset in _seen or str(Path(preset).resolve()) in _seen:
            raise YxanulError(f"presets refer to each other in a loop ({' -> '.join(map(str, _seen))})",
                              source=source, key="preset")
        base = load_model_config(preset, _seen=_seen + (spec, str(Path(spec).resolve())))
    data.setdefault("name", name)
    cfg = dataclass_from_dict(ModelConfig, data, source, base=base)
    if overrides:
        cfg = dataclass_from_dict(ModelConfig, overrides, "overrides", base=cfg)
    return cfg.validate(source)
