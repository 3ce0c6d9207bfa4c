"""Writing result files so that a killed or failing write never leaves half a file, and a full
disk is a clear error (``UserError``: exit code 2) naming the file, not a traceback."""

from __future__ import annotations

import errno
import functools
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from t0s1.errors import UserError

STORAGE_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
"""Errors that mean no more bytes fit: the disk (or quota) is full, or a file size limit was hit."""


def is_storage_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in STORAGE_FULL:
        return True
    # Some writers (pyarrow) raise an OSError that carries only the system's message.
    text = str(error)
    return isinstance(error, OSError) and any(os.strerror(code) in text for code in STORAGE_FULL)


def storage_full_error(path: str | Path, error: BaseException, kept: str) -> UserError:
    """The ``UserError`` for a write to ``path`` that ran out of space; ``kept`` says what is safe."""
    reason = getattr(error, "strerror", None) or str(error)
    return UserError(
        f"Could not write {path}: {reason} (the disk is full, or a quota or file size limit was reached). "
        f"{kept} Free some space and rerun the same command."
    )


@contextmanager
def writing(path: str | Path, kept: str = "Nothing already written was lost.") -> Iterator[None]:
    """Turn a full disk while writing ``path`` into a ``UserError`` naming it."""
    try:
        yield
    except OSError as error:
        if is_storage_full(error):
            raise storage_full_error(path, error, kept) from None
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed over it: readers see the old
    file or the new one, never a part of it."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path, f"{path} is unchanged."):
        try:
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that takes a file name (a plot); renamed over
    ``path`` when the block ends without an error, removed otherwise."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    with writing(path, f"{path} is unchanged."):
        try:
            yield temporary
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """A staging directory beside ``path`` for a writer that fills a directory (a converted model);
    renamed to ``path`` when the block ends without an error, removed otherwise, so a killed writer
    never leaves half a directory. Where another process renamed its own there first, that one is
    kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    os.chmod(staging, 0o777 & ~umask())  # mkdtemp's 0700 would hide a shared cache from other users
    with writing(path, f"{path} is unchanged."):
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            os.replace(staging, path)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not path.exists():
                raise


@functools.cache
def umask() -> int:
    """The process's umask (read once: setting it back and forth is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """Refuse, before any work, an output file that cannot be written: a directory, or a file in
    a folder that cannot be created or written to (a missing folder is created)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give the path of a file.")
    check_output_directory(path.parent, f"{flag} {path}: the folder")
    return path


def check_output_directory(path: str | Path, flag: str = "--out") -> Path:
    """Create the output directory ``path`` now (before any work), or say why it cannot be."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot create the directory ({error.strerror or error}).") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: the directory is not writable.")
    return path


def left_by_dead_processes(directory: Path, prefix: str) -> list[Path]:
    """The entries of ``directory`` named ``prefix`` + a process id (then anything after a ``-`` or
    ``.``) whose process is gone: staging folders a killed writer left. A running writer's are not
    among them."""
    left = []
    for entry in sorted(Path(directory).glob(glob.escape(prefix) + "*")):
        pid = entry.name[len(prefix):].replace(".", "-").split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            left.append(entry)
    return left


_ATOMIC_TEMPORARY = re.compile(r"\.(?P<base>.+)\.(?P<pid>\d+)\.tmp(?P<suffix>\.[^.]+)?")
"""The name of ``write_text_atomic``'s (``.NAME.PID.tmp``) and ``atomic_path``'s
(``.STEM.PID.tmp.SUFFIX``) temporary files: the file they become, and the writer's pid."""


def remove_atomic_leftovers(directory: str | Path, targets: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporary files of ``write_text_atomic`` and ``atomic_path`` in ``directory``
    that processes killed between the write and the rename left (a running writer's are kept):
    of every file, or of the file names ``targets`` only (a folder that is not the caller's own).
    Returns them."""
    wanted = None if targets is None else set(targets)
    removed = []
    for entry in Path(directory).glob(".*.tmp*"):
        match = _ATOMIC_TEMPORARY.fullmatch(entry.name)
        if not match or not entry.is_file() or process_alive(int(match["pid"])):
            continue
        if wanted is None or match["base"] + (match["suffix"] or "") in wanted:
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (another user's included): the owner of a staging folder named
    after its process id may still be writing it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_json_object(path: str | Path) -> dict | None:
    """The JSON object in ``path``; None when the file cannot be read, is not UTF-8 JSON, or holds
    something else (the caller says what the file should have been)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None

