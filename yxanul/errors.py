"""One error type for everything a user can get wrong; the CLI maps it to exit code 2."""
import reprlib

MAX_USER_CHARS = 200
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 2, 80, 40, 40
_REPR.maxtuple = _REPR.maxlist = _REPR.maxarray = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 4


def clip(text, limit: int = MAX_USER_CHARS) -> str:
    """`text` fit for a one-line message: control characters escaped, at most `limit` characters."""
    s = str(text)
    if not s.isprintable():
        s = s.encode("unicode_escape", "backslashreplace").decode("ascii")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def first_line(e: BaseException) -> str:
    """An exception as one short line: its message's first line, clipped (its type's name when it has none)."""
    lines = str(e).strip().splitlines()
    return clip(lines[0]) if lines else type(e).__name__


def brief(value, limit: int = MAX_USER_CHARS) -> str:
    """A bounded repr of a user-supplied value: large or deeply nested structures are never expanded."""
    try:
        return clip(_REPR.repr(value), limit)
    except ValueError:  # an integer past Python's digit limit for str()
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits" if isinstance(value, int) \
            else "a value too large to show"


class YxanulError(Exception):
    """A user-facing error: bad input, bad config, bad file. Its message is one line."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        parts = []
        if source:
            parts.append(clip(source))
        if key:
            parts.append(clip(key))
        prefix = ": ".join(parts)
        self.source = source
        self.key = key
        self.detail = message
        super().__init__(f"{prefix}: {message}" if prefix else message)


class NonFiniteError(YxanulError):
    """NaN or Inf found where a finite value is required (quantization input, loss, grads)."""

