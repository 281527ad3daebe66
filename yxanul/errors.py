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

