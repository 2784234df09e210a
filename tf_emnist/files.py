"""Atomic writes: a reader never sees half a file, an interrupted write loses nothing."""
from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False):
    """Yield a temporary sibling of `path`; on success rename it onto `path`.

    A failure (or Ctrl-C) removes the temporary and leaves `path` as it was.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(path)
    prefix = f".{os.path.basename(path)}.tmp-{os.getpid()}-"
    if directory:
        tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=prefix, dir=parent, suffix=os.path.splitext(path)[1])
        os.close(fd)
    # mkdtemp and mkstemp make private (0700, 0600) entries; the result gets the usual
    # permissions, so that a model server running as another user can read an export.
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete the temporaries of `path` that a killed process left (their pid is in the name)."""
    path = os.fspath(path)
    pattern = os.path.join(os.path.dirname(os.path.abspath(path)), f".{glob.escape(os.path.basename(path))}.tmp-*")
    for tmp in glob.glob(pattern):
        pid = os.path.basename(tmp).rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(tmp)


def create_exclusive(path: str | os.PathLike, text: str) -> bool:
    """Create `path` holding `text`, whole, unless it exists (then False). The text is written to a temporary
    file first and linked into place, so no reader sees half of it, and a failed write leaves nothing."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def disk_full(error: BaseException) -> bool:
    """Whether an error, whichever library raised it (h5py and TensorFlow raise their own), is a full disk."""
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (or cannot be told): never treat it as stale
    return True


def exchange_paths(a: str, b: str) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported.

    A reader sees either the old or the new entry at each path, never neither.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """rows as CSV with a header of every key seen, atomically."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(folder: str | os.PathLike, skip: tuple[str, ...] = ()) -> dict:
    """Every file under `folder` but the top-level names in `skip`: relative path -> its bytes and sha256."""
    folder = os.fspath(folder)
    digests = {}
    for root, dirs, files in os.walk(folder):
        if root == folder:
            dirs[:] = [d for d in dirs if d not in skip]
        for name in sorted(files):
            path = os.path.join(root, name)
            if root == folder and name in skip:
                continue
            digests[os.path.relpath(path, folder)] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
    return dict(sorted(digests.items()))


def damaged_files(folder: str | os.PathLike, recorded: dict) -> list[str]:
    """The files of `recorded` (see file_digests) that are missing from `folder` or differ, each in words."""
    problems = []
    for name, expected in recorded.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
        elif os.path.getsize(path) != expected["bytes"]:
            problems.append(f"{name} holds {os.path.getsize(path):,} bytes, not the {expected['bytes']:,} written")
        elif sha256_file(path) != expected["sha256"]:
            problems.append(f"{name} differs from the file written (sha256)")
    return problems


def read_json(path: str | os.PathLike):
    with open(path) as f:
        return json.load(f)


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """A JSON object from a user's file, or a one-line ValueError naming `what` and the problem."""
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a directory; give the JSON file inside it") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not a text file; give a JSON file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate it") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path} must hold a JSON object")
    return value


def save_figure(figure, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120, bbox_inches="tight")
