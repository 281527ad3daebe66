"""Safe output: atomic file and folder writes, and the rules for what an output may replace.

Every write goes to a temporary sibling renamed onto its target only when complete, so a failed or killed
command leaves no partial output. A command that writes a folder OUT states its inputs and its name:

* OUT may not be, contain, or lie inside any input (symbolic links resolved);
* an existing OUT is replaced only with ``overwrite`` and only if it is an empty folder or a folder carrying
  the marker file (:data:`MARKER`) that the same command left there; never a file, a link or a foreign folder;
* temporary siblings left by a killed run of the same command on the same OUT are removed (their name holds
  the writer's process id; only those of processes no longer alive are touched).

An ``OSError`` while writing (disk full, read-only folder, permission denied) becomes a one-line
:class:`YxanulError` naming the target and the cause. Written files get the permissions an ordinary ``open``
would give them (``0666`` less the umask), like the JSON files beside them.
"""
from __future__ import annotations

import contextlib
import errno as errno_mod
import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from . import __version__
from .errors import YxanulError, clip, first_line

MARKER = ".yxanul-output.json"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.(?:tmp|old)$")
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")   # how safetensors reports an I/O error
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed", "inline_container.cc")  # torch.save's failed writes


class WriteError(YxanulError):
    """An output could not be written (disk full, read-only folder, permission denied...)."""


def parse_json(text: str, source: str, where: str = ""):
    """``json.loads`` for a user's file: malformed JSON, a number past Python's digit limit (ValueError) or nesting
    too deep for the parser (RecursionError) is a one-line error naming `source`; `where` prefixes the reason (a
    line number)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        why = f"{e.msg} (line {e.lineno})" if not where else e.msg
    except ValueError as e:  # an integer past sys.get_int_max_str_digits(); drop the advice to raise it
        why = first_line(e).split(";")[0]
    except RecursionError:
        why = "nested too deeply"
    raise YxanulError(f"{where}invalid JSON ({why})", source=source)


def read_json_file(path: str | os.PathLike, missing: str = "no such file"):
    """The JSON value of a file the user handed us (meta.json, config.json, ...): a missing or unreadable file,
    text that is not UTF-8 or JSON that :func:`parse_json` refuses is a one-line error naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise YxanulError(missing, source=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise YxanulError(f"unreadable: {first_line(e)}", source=str(path)) from None
    return parse_json(text, str(path))


# ---------------------------------------------------------------------------------------------------------------
# write errors
# ---------------------------------------------------------------------------------------------------------------
def write_error(exc: BaseException, target: str | os.PathLike, tmp: str | os.PathLike | None = None):
    """The one-line YxanulError for a failed write, or None if `exc` is not an operating-system write error.

    `target` is the path the user asked for; a file name inside the temporary sibling `tmp` is reported at its
    final place. Besides ``OSError``, the I/O errors that safetensors reports as ``(os error N)`` and the failed
    writes of ``torch.save`` (which carry no error number: the free space is reported instead) are recognised.
    """
    name = None
    if isinstance(exc, OSError) and exc.errno is not None:
        code, name = exc.errno, exc.filename
        cause = os.strerror(code) + (f" ({errno_mod.errorcode[code]})" if code in errno_mod.errorcode else "")
    elif isinstance(exc, Exception) and _RUST_OS_ERROR.search(str(exc)):
        code = int(_RUST_OS_ERROR.search(str(exc)).group(1))
        cause = os.strerror(code) + (f" ({errno_mod.errorcode[code]})" if code in errno_mod.errorcode else "")
    elif isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_WRITE_FAILED):
        free = free_disk(target)
        cause = "the write failed" + (f" ({_gb(free)} free on its disk)" if free is not None else "")
    else:
        return None
    where = Path(os.fsdecode(name)) if isinstance(name, (str, bytes, os.PathLike)) else Path(target)
    if tmp is not None:
        with contextlib.suppress(ValueError):
            where = Path(target) / where.relative_to(tmp)
    return WriteError(f"cannot write: {cause}", source=clip(os.fsdecode(where)))


@contextlib.contextmanager
def _one_line_write_errors(target, tmp=None):
    try:
        yield
    except YxanulError:
        raise
    except Exception as e:  # noqa: BLE001 - only OS write errors are translated, the rest re-raised as is
        err = write_error(e, target, tmp)
        if err is None:
            raise
        raise err from None


# ---------------------------------------------------------------------------------------------------------------
# room for what is about to be written or allocated
# ---------------------------------------------------------------------------------------------------------------
def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def free_disk(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system that would hold `path` (its first existing ancestor); None if unknown."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation without swapping (Linux MemAvailable); None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_disk(path: str | os.PathLike, need: int, what: str = "the output") -> None:
    """Refuse before writing when `need` bytes will not fit next to `path`."""
    free = free_disk(path)
    if free is not None and need > free:
        raise YxanulError(f"{what} needs {_gb(need)}, {_gb(free)} available on its disk", source=clip(path))


def check_memory(need: int, what: str) -> None:
    """Refuse before allocating when `need` bytes exceed the available memory."""
    avail = available_memory()
    if avail is not None and need > avail:
        raise YxanulError(f"{what} needs {_gb(need)} of memory, {_gb(avail)} available")


# ---------------------------------------------------------------------------------------------------------------
# temporary siblings
# ---------------------------------------------------------------------------------------------------------------
def tmp_sibling(path: Path, kind: str = "tmp") -> Path:
    """A hidden sibling name for `path`'s temporary (or replaced ``old``) copy, carrying this process's id so
    that a later writer can tell a killed writer's leftovers (:func:`is_stale_temporary`)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):   # someone else's, or not a process id we could own
        return True
    return True


def sha256_of(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def is_stale_temporary(p: Path) -> bool:
    """Whether `p` is a temporary this module named (``.NAME.PID-XXXXXXXX.tmp`` / ``.old``) whose writer is gone."""
    m = _TMP_RE.match(p.name)
    return bool(m) and not p.is_symlink() and not _pid_alive(int(m.group("pid")))


def _marker_command(folder: Path) -> str | None:
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data.get("command") if isinstance(data, dict) and isinstance(data.get("command"), str) else None


def remove_stale_temporaries(path: str | os.PathLike, command: str | None = None) -> list[Path]:
    """Remove the temporary siblings of `path` that killed writers left behind; returns what was removed.

    Only names this module makes (``.NAME.PID-XXXXXXXX.tmp`` / ``.old``) whose process is gone are removed; a
    temporary folder must also carry `command`'s marker (a file has none: the name alone decides).
    """
    path = Path(path)
    removed: list[Path] = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = _TMP_RE.match(p.name)
        if not m or m.group("name") != path.name or _pid_alive(int(m.group("pid"))) or p.is_symlink():
            continue
        if p.is_dir():
            if command is None or _marker_command(p) != command:
                continue
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# what an output may replace
# ---------------------------------------------------------------------------------------------------------------
def _resolve(p) -> Path:
    return Path(os.path.abspath(Path(p).expanduser())).resolve()


def check_apart(out: str | os.PathLike, inputs, *, allow_inside: bool = False) -> None:
    """OUT must not be an input, contain one, or (unless `allow_inside`) lie inside an input folder."""
    o = _resolve(out)
    for i in inputs:
        if i is None:
            continue
        r = _resolve(i)
        if o == r:
            raise YxanulError(f"is the input {clip(i)}; the output must differ from the input and must not "
                              f"contain it", source=clip(out))
        if r.is_relative_to(o):
            raise YxanulError(f"holds the input {clip(i)}; the output must differ from the input and must not "
                              f"contain it", source=clip(out))
        if not allow_inside and o.is_relative_to(r):
            raise YxanulError(f"lies inside the input {clip(i)}; choose an output outside it", source=clip(out))


def check_replaceable(out: str | os.PathLike, command: str, overwrite: bool) -> None:
    """An existing OUT folder may be replaced only with `overwrite`, and only if it is empty or our own output."""
    out = Path(out)
    if not os.path.lexists(out):
        return
    how = (f"only an empty folder or an earlier `yxanul {command}` output is replaced; remove it yourself or "
           f"choose another OUT")
    if not overwrite:
        raise YxanulError(f"exists; pass --overwrite to replace it ({how})", source=clip(out))
    if out.is_symlink():
        raise YxanulError(f"is a symbolic link, not replaced ({how})", source=clip(out))
    if not out.is_dir():
        raise YxanulError(f"is a file where the output folder goes, not replaced ({how})", source=clip(out))
    try:
        entries = [p.name for p in out.iterdir()]
    except OSError as e:
        raise YxanulError(f"cannot list: {e.strerror}", source=clip(out)) from None
    if entries and _marker_command(out) != command:
        raise YxanulError(f"holds files not written by `yxanul {command}`, not replaced ({how})", source=clip(out))


def check_output_file(path: str | os.PathLike, overwrite: bool, *, inputs=None, key: str | None = None) -> None:
    """An output FILE may replace an existing regular file only with `overwrite`; never a folder, a link or
    another non-file, and (with `inputs`) never an input or a folder holding one. For commands that write the
    file late (after a long run), call it up front as well: :func:`atomic_path` checks again."""
    path = Path(path)
    if inputs is not None:
        check_apart(path, inputs, allow_inside=True)
    folder = path.parent  # the nearest existing folder above: a regular file there makes the path unwritable
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if os.path.lexists(folder) and not folder.is_dir():
        raise YxanulError(f"cannot be written: {clip(folder)} is not a folder", source=clip(path), key=key)
    if os.path.lexists(path):
        if path.is_symlink() or not path.is_file():
            raise YxanulError("exists and is not a regular file; remove it yourself or choose another path",
                              source=clip(path), key=key)
        if not overwrite:
            raise YxanulError("exists; pass --overwrite to replace it", source=clip(path), key=key)


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _ordinary_modes(root: Path) -> None:
    """Files the writer created with narrower permissions (safetensors writes 0600) get ``0666`` less the umask,
    like those of an ordinary ``open``."""
    mode = 0o666 & ~_umask()
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    for p in files:
        if p.stat().st_mode & 0o777 != mode:
            os.chmod(p, mode)


def _write_marker(folder: Path, command: str) -> None:
    (folder / MARKER).write_text(json.dumps({"command": command, "version": __version__}) + "\n",
                                 encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, inputs=None, overwrite: bool = True):
    """Yield a temporary file path next to `path`; rename it onto `path` if the block succeeds.

    With `inputs`, `path` may be none of them and no folder holding one. An existing folder, link or
    other non-file at `path` is never replaced; an existing file only with `overwrite`.
    """
    path = Path(path)
    check_output_file(path, overwrite, inputs=inputs)
    with _one_line_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        tmp = tmp_sibling(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        os.close(fd)
    try:
        with _one_line_write_errors(path, tmp):
            yield tmp
            _ordinary_modes(tmp)
            check_output_file(path, overwrite)   # again: `path` may have appeared while the block ran
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False, *, command: str | None = None, inputs=()):
    """Yield a temporary folder; on success it replaces `out`.

    With `command` (a user-facing command writing OUT), the rules of this module apply: `out` is checked
    against `inputs`, may be replaced only if empty or marked by the same command, gets that marker, and stale
    temporaries of earlier killed runs are removed. Without `command` (internal folders, such as training
    checkpoints), `out` must not exist unless `overwrite`. Nothing is left at `out` if the block raises.
    """
    out = Path(out)
    if command is not None:
        check_apart(out, inputs)
        check_replaceable(out, command, overwrite)
    elif out.exists() and not overwrite:
        raise YxanulError("exists; pass --overwrite to replace it", source=clip(out))
    with _one_line_write_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out, command)
        tmp = tmp_sibling(out)
        tmp.mkdir()  # 0777 less the umask: the result is an ordinary folder
    try:
        with _one_line_write_errors(out, tmp):
            if command is not None:
                _write_marker(tmp, command)
            yield tmp
            if command is not None:
                _ordinary_modes(tmp)
            # again at the swap: `out` may have appeared or changed while the command ran
            if command is not None:
                check_replaceable(out, command, overwrite)
            elif os.path.lexists(out) and not overwrite:
                raise YxanulError("appeared while this command ran; pass --overwrite to replace it", source=clip(out))
            if os.path.lexists(out):
                old = tmp_sibling(out, "old")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
            else:
                os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
