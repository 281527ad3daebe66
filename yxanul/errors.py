"""One error type for everything a user can get wrong; the CLI maps it to exit code 2."""


class YxanulError(Exception):
    """A user-facing error: bad input, bad config, bad file. Its message is one line."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        parts = []
        if source:
            parts.append(str(source))
        if key:
            parts.append(str(key))
        prefix = ": ".join(parts)
        self.source = source
        self.key = key
        self.detail = message
        super().__init__(f"{prefix}: {message}" if prefix else message)


class NonFiniteError(YxanulError):
    """NaN or Inf found where a finite value is required (quantization input, loss, grads)."""


def check_env_switches() -> None:
    """Read every environment switch once, so that a bad value is an error before any work starts (some are
    otherwise only read inside a forward pass)."""
    from .fp8.backends import amax_layout, block_path
    from .fp8.fused_mlp import fused_swiglu_enabled
    from .fp8.linear import weight_cache_mode
    from .kernels import tensor_path
    amax_layout(), block_path(), fused_swiglu_enabled(), tensor_path(), weight_cache_mode()


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """The value of environment switch `name`, one of `choices` (`default` when unset); anything else is a
    YxanulError naming the variable."""
    import os
    v = os.environ.get(name, default)
    if v not in choices:
        raise YxanulError(f"must be one of {', '.join(choices)}, got {v!r}", key=name)
    return v
