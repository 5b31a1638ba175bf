"""Writing files a reader may open: atomic replace, strict JSON, orphaned-temp cleanup;
and the one file hash (:func:`file_hexdigest`).

Every file vqkit writes for a person or a later run (checkpoints, exported weights,
pictures, JSON, the decoded-data cache) goes through :func:`atomic_write`:

* the data goes to a temp file ``.{name}.{host}.{pid}.{random}.tmp`` in the target's
  folder, is fsync'ed and then ``os.replace``-d onto the target: a reader sees the old
  file or the new one, never a partial one, and a crash keeps the old file;
* the new file gets the mode an ordinary ``open(path, "w")`` would give it (the old
  file's mode, else ``0o666`` minus the umask), also when the writer (safetensors) makes
  its output 0600;
* on a full disk (ENOSPC), an exceeded quota (EDQUOT) or the process's file-size limit
  (EFBIG, ``ulimit -f``) it raises :class:`DiskFullError` with a one-line message naming
  the file, keeps the old file and removes the temp. Writers that do not raise an
  OSError are recognised too (:func:`is_disk_full`): ``torch.save`` raises
  ``RuntimeError: [enforce fail at inline_container.cc] ... unexpected pos`` and
  safetensors a ``SafetensorError`` mentioning "os error 28"; a failed write is then
  taken as a full disk when the target's filesystem has (almost) no space left, or the
  temp file reached the file-size limit;
* a temp file orphaned by a killed writer (kill -9, power loss) is removed later by
  :func:`clean_stale_temps`, which reads the writer's host and pid from the name.

JSON is strict both ways: :func:`dump_json` / :func:`write_json` never write ``NaN`` or
``Infinity`` (which most JSON readers reject); a non-finite float becomes ``null``. And
:func:`loads_json`, the one reader of every JSON file vqkit opens (configs, sidecars,
manifests, metadata, metrics lines), refuses what Python's ``json.loads`` lets through:
``NaN`` / ``Infinity`` literals and an object naming a key twice (which ``json.loads``
settles silently by keeping the last).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = [
    "DiskFullError",
    "StrictJSONError",
    "atomic_write",
    "clean_stale_temps",
    "disk_full_error",
    "file_hexdigest",
    "dump_json",
    "is_disk_full",
    "json_object",
    "loads_json",
    "mirror_paths",
    "temp_path",
    "write_json",
]

_EDQUOT = getattr(errno, "EDQUOT", errno.ENOSPC)
_DISK_FULL = {errno.ENOSPC, _EDQUOT, errno.EFBIG}
# the same conditions in the text of exceptions that carry no errno (safetensors' Rust
# I/O errors, numpy or PIL wrappers): "os error 28", "No space left on device", ...
_FULL_CODES = (errno.ENOSPC, _EDQUOT, errno.EFBIG)
_DISK_FULL_TEXT = re.compile(
    "|".join(
        [rf"os error {c}\b" for c in _FULL_CODES] + [re.escape(os.strerror(c)) for c in _FULL_CODES]
    ),
    re.IGNORECASE,
)
NEARLY_FULL_BYTES = 1 << 20
"""A write that failed on a filesystem with less free space than this failed for lack of
space, whatever exception the writer raised (torch.save's carries no errno)."""
# .{name}.{host}.{pid}.{6 hex}.tmp; the name part may itself contain dots
_TEMP_RE = re.compile(r"^\..*\.([A-Za-z0-9-]{1,16})\.(\d+)\.[0-9a-f]{6}\.tmp$")
DEFAULT_STALE_AGE_S = 3600.0
"""A temp file whose writer cannot be shown dead is removed once it is this old."""


class DiskFullError(OSError):
    """A write failed because the disk is full or the quota is exhausted; the previous
    version of the file is unchanged. ``errno`` is ENOSPC or EDQUOT, ``filename`` the
    target; ``str()`` is the one-line message alone (no "[Errno 28]" prefix)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def is_disk_full(e: BaseException, path: str | os.PathLike[str] | None = None) -> bool:
    """True when ``e`` means "no space left" (ENOSPC), "quota exceeded" (EDQUOT) or "file
    too large" for the process's file-size limit (EFBIG).

    An OSError is judged by its errno. Any other exception of a writer (torch.save's
    RuntimeError, safetensors' SafetensorError) counts when its text names one of those
    conditions or, given ``path`` (the partly written file), when the filesystem holding
    it has less than :data:`NEARLY_FULL_BYTES` free or the file reached the file-size
    limit (``RLIMIT_FSIZE``)."""
    return _full_errno(e, path) is not None


def _full_errno(e: BaseException, path: str | os.PathLike[str] | None) -> int | None:
    """The errno (ENOSPC, EDQUOT, EFBIG) that ``e`` amounts to, else None."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno if e.errno in _DISK_FULL else None
    # not for interrupts, and not for the errors of a programming mistake
    if not isinstance(e, Exception) or isinstance(e, (TypeError, AttributeError, KeyError)):
        return None
    m = _DISK_FULL_TEXT.search(str(e))
    if m:
        text = m.group(0).lower()
        if text in (os.strerror(_EDQUOT).lower(), f"os error {_EDQUOT}"):
            return _EDQUOT
        if text in (os.strerror(errno.EFBIG).lower(), f"os error {errno.EFBIG}"):
            return errno.EFBIG
        return errno.ENOSPC
    if path is None:
        return None
    path = Path(path)
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and os.stat(path).st_size >= limit:
            return errno.EFBIG
    except (ImportError, OSError, ValueError):
        pass
    try:
        st = os.statvfs(path if path.is_dir() else path.parent)
    except OSError:
        return None
    # root may write into the blocks reserved for it: count those too
    free = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    return errno.ENOSPC if free * st.f_frsize < NEARLY_FULL_BYTES else None


def _host_tag() -> str:
    tag = re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname().split(".")[0])[:16]
    return tag or "host"


def disk_full_error(code: int, path: str | os.PathLike[str]) -> DiskFullError:
    """The one-line :class:`DiskFullError` for errno ``code`` (ENOSPC, EDQUOT, EFBIG)
    while writing ``path``."""
    what, todo = "no space left on device", "Free some space and try again"
    if code == _EDQUOT and code != errno.ENOSPC:
        what = "disk quota exceeded"
    elif code == errno.EFBIG:
        what, todo = "file too large for the file-size limit", "Raise the limit (ulimit -f)"
    msg = f"{what} writing {path}; the previous version (if any) is unchanged. {todo}"
    return DiskFullError(code, msg, str(path))


def _target_mode(path: Path, fd: int) -> int:
    """The mode open(path, "w") would leave: the old file's, else umask-applied 0o666 (the
    fresh temp was created with 0o666, so its mode already has the umask applied; reading
    it avoids os.umask(), which is process-global and racy)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return os.fstat(fd).st_mode & 0o777


def temp_path(path: str | os.PathLike[str]) -> Path:
    """A fresh temp name for ``path`` in its folder, ``.{name}.{host}.{pid}.{random}.tmp``:
    :func:`clean_stale_temps` removes what is left under such a name (a file, or a
    staging folder) once its writer is gone."""
    path = Path(path)
    # keep the whole name under NAME_MAX (255) with room for the suffix
    return path.parent / (
        f".{path.name[:200]}.{_host_tag()}.{os.getpid()}.{secrets.token_hex(3)}.tmp"
    )


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)``, then move the temp file onto ``path`` atomically.

    ``write`` receives the path of an empty temp file in ``path``'s folder and may
    rewrite or recreate it. Raises :class:`DiskFullError` on ENOSPC/EDQUOT; on any
    failure the temp file is removed and the old ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            mode = _target_mode(path, fd)
        finally:
            os.close(fd)
        write(str(tmp))
        os.chmod(tmp, mode)  # safetensors' save_file, for one, leaves 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        code = _full_errno(e, tmp)  # before the unlink frees the temp's space
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if code is not None:
            raise disk_full_error(code, path) from e
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; not every platform or filesystem allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, owned by someone else
        return False
    return False


def clean_stale_temps(
    directory: str | os.PathLike[str], *, max_age_s: float = DEFAULT_STALE_AGE_S
) -> list[Path]:
    """Remove temp files (``.*.tmp``, and staging folders so named) in ``directory`` left
    behind by killed writers.

    A temp file is removed when its name says it was written on this host by a process
    that no longer exists, or when it is older than ``max_age_s`` seconds (another host,
    a reused pid, or a name without a pid). Temps of live writers, this process's own,
    and every other file are left alone. Returns the removed paths; a missing directory
    gives ``[]``.
    """
    directory = Path(directory)
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    host, me, now = _host_tag(), os.getpid(), time.time()
    removed = []
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(".tmp")):
            continue
        try:
            folder = entry.is_dir(follow_symlinks=False)  # a staging folder (vqkit pack)
            if not folder and not entry.is_file(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue  # vanished meanwhile: its writer finished
        m = _TEMP_RE.match(name)
        if m and m.group(1) == host and int(m.group(2)) == me:
            continue
        dead = bool(m) and m.group(1) == host and _pid_dead(int(m.group(2)))  # type: ignore[union-attr]
        if dead or age > max_age_s:
            try:
                if folder:
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(directory / name)
    return removed


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None; numpy scalars and 0-d
    tensors become Python numbers, tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    # numpy scalar, 0-d array or 0-d tensor (all have shape ())
    if callable(getattr(obj, "item", None)) and tuple(getattr(obj, "shape", (1,))) == ():
        return _finite(obj.item())
    return obj


def _json_type(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    kinds = ((dict, "an object"), (list, "an array"), (str, "a string"), ((int, float), "a number"))
    return next((name for t, name in kinds if isinstance(value, t)), type(value).__name__)


def json_object(value: Any, field: str, where: Any, error: type[UserError] = UserError) -> dict:
    """``value`` (a field read from a JSON file) when it is a JSON object; else ``error``
    on one line naming the file and the field and what it holds instead (a list of pairs
    is not taken for an object, as ``dict()`` would)."""
    if not isinstance(value, dict):
        raise error(f"{where}: its {field!r} field must be a JSON object, not {_json_type(value)}")
    return value


class StrictJSONError(ValueError):
    """Text that ``json.loads`` would take and vqkit refuses: ``NaN`` / ``Infinity``,
    which are not JSON at all, and a key repeated in one object, which RFC 8259 says
    should not happen and readers settle differently (a :class:`ValueError`, as
    ``json.JSONDecodeError`` is, so one ``except ValueError`` catches both)."""


def _no_constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not a JSON value (write null, or a number)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise StrictJSONError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def loads_json(text: str | bytes) -> Any:
    """Strict JSON text -> Python: as ``json.loads``, but ``NaN`` / ``Infinity`` /
    ``-Infinity`` and repeated keys in an object raise :class:`StrictJSONError`
    (malformed text raises ``json.JSONDecodeError``; both are ValueErrors)."""
    return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)


def dump_json(obj: Any, *, indent: int | None = None, sort_keys: bool = False) -> str:
    """Strict JSON text of ``obj``: a NaN or +/-Infinity float anywhere becomes ``null``
    (so "no value" is explicit and every JSON reader accepts the file). numpy scalars and
    0-d tensors are written as numbers. Other non-JSON objects are a TypeError."""
    return json.dumps(_finite(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json(
    path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, sort_keys: bool = False
) -> None:
    """Write ``dump_json(obj)`` plus a newline to ``path`` atomically (see :func:`atomic_write`)."""
    text = dump_json(obj, indent=indent, sort_keys=sort_keys) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def mirror_paths(inputs: list[Path], out: Path, suffix: str) -> list[Path]:
    """One output per input, mirroring the inputs' paths below their common folder, so
    ``a/img.png`` and ``b/img.png`` stay apart; refuses names that still collide."""
    resolved = [p.resolve() for p in inputs]
    root = Path(os.path.commonpath([p.parent for p in resolved])) if resolved else Path(".")
    names = [out / p.relative_to(root).with_suffix(suffix) for p in resolved]
    seen: dict[Path, Path] = {}
    for src, name in zip(inputs, names, strict=True):
        if name in seen:
            raise UserError(f"{seen[name]} and {src} would both be written to {name}")
        seen[name] = src
    return names


def decoded_names(stem: Path, count: int) -> list[Path]:
    """The PNGs of ``count`` images decoded from one input: ``stem.png`` for one,
    ``stem_0.png``, ``stem_1.png``, ... for a batch (``vqkit decode`` / ``decompress``)."""
    if count == 1:
        return [stem.with_name(stem.name + ".png")]
    return [stem.with_name(f"{stem.name}_{i}.png") for i in range(count)]


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """UserError (one line) naming the first of ``paths`` that exists, unless
    ``overwrite``: a command replaces a user's files only when told to (``--overwrite``),
    and says so before it computes or writes anything."""
    existing = [] if overwrite else [p for p in paths if p.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more outputs)" if len(existing) > 1 else ""
        raise UserError(f"{existing[0]} exists{more}; pass --overwrite to replace")


def file_hexdigest(path: str | os.PathLike[str], algorithm: str) -> str:
    """Hex digest of a file's bytes by a :mod:`hashlib` ``algorithm`` ("sha256", "md5"),
    read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
