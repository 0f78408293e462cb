"""Writing files so that a failure leaves nothing half-written and says so in one line.

    make_dir(path, what)                     an output folder, made if needed; a file there, a read-only or
                                              full disk: UserError naming it
    with atomic(path) as tmp: write(tmp)     the file appears complete or not at all; the temporary file is
                                              removed on every way out (an exception, Ctrl-C)
    with atomic_file(path) as f: f.write()   the same, through an open file (text, or mode="wb")
    write_json(path, obj)                    a JSON file, atomically
    with reported(what, path): write...      a failed write (full, read-only) is one line naming it
    write_together({path: text}, what)       several files that belong together (report.md + report.csv): all
                                              written before any replaces its old version; failures: UserError
    remove_stale_temporaries(folder)         temporary files that dead processes left (a kill -9, a SIGTERM)
    failure(e, folder)                       one-line reason of a failed write, with the free space when low

A temporary file is `<path>.tmp<pid>-<host>`: the host tells whether its writer could be asked about (the
folder may be shared by several machines), the pid whether that writer still runs. A file whose writer is
dead, or that nobody has written for STALE_SECONDS (no write of ours pauses that long), is removed.
"""
import contextlib
import json
import os
import re
import shutil
import socket
import time

from errors import UserError

HOST = socket.gethostname()
STALE_SECONDS = 3600
TEMPORARY_NAME = re.compile(r"\.tmp(\d+)(?:-([^/]+))?$")  # .tmp<pid> (older files: no host) or .tmp<pid>-<host>
LOW_SPACE = 256 << 20  # below this the free space is part of a failure's reason


def make_dir(path: str, what: str) -> str:
    """`path` as a folder that exists (made with its parents if needed); UserError naming `what` otherwise."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path} is a file, not a folder; give a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {what} {path}: {failure(e, existing_parent(path))}") from None
    return path


def existing_parent(path: str) -> str:
    """The nearest folder that exists at or above `path` (where the free space of a failed write is asked)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def temporary(path: str) -> str:
    return f"{path}.tmp{os.getpid()}-{HOST}"


@contextlib.contextmanager
def atomic(path: str):
    """Yields a temporary path next to `path`; renamed to `path` if the block ends normally, removed otherwise."""
    tmp = temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)  # a reader never sees half a file
    finally:
        with contextlib.suppress(OSError):
            if os.path.lexists(tmp):
                os.remove(tmp)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w"):
    """atomic(), through a file opened in `mode`: `path` holds what the block wrote once it ends normally."""
    with atomic(path) as tmp, open(tmp, mode) as f:
        yield f


def write_json(path: str, obj) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


@contextlib.contextmanager
def reported(what: str, path: str, error=UserError, then: str = ""):
    """A write that fails (a full disk, a read-only folder, a file where a folder should be; torch.save reports
    these as RuntimeError) becomes one line: `error`("cannot write <what> <path>: <reason>[; <then>]")."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        reason = failure(e, existing_parent(os.path.dirname(os.path.abspath(path))))
        raise error(f"cannot write {what} {path}: {reason}{'; ' + then if then else ''}") from None


def write_together(texts: dict, what: str) -> None:
    """{path: text} written atomically and together: every file is complete before the first is renamed into
    place, so a failure (full disk, read-only folder, a path that is a folder) changes none of them. A failure
    is a UserError naming `what` and the path."""
    done = []
    with contextlib.ExitStack() as stack:
        try:
            for path, text in texts.items():
                tmp = stack.enter_context(_temporary_only(path))
                with open(tmp, "w", newline="") as f:
                    f.write(text)
                done.append((tmp, path))
            for tmp, path in done:
                os.replace(tmp, path)
        except OSError as e:
            path = e.filename if isinstance(e.filename, str) else next(iter(texts))
            raise UserError(f"cannot write {what} {_untemporary(path)}: {failure(e, os.path.dirname(path))}") from None


@contextlib.contextmanager
def _temporary_only(path: str):
    tmp = temporary(path)
    try:
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            if os.path.lexists(tmp):
                os.remove(tmp)


def _untemporary(path: str) -> str:
    return TEMPORARY_NAME.sub("", path)


def _writer_is_dead(pid: int, host: str | None) -> bool:
    if host not in (None, HOST):
        return False  # another machine's process: only its age can tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_temporaries(folder: str) -> list[str]:
    """Removes the temporary files in `folder` whose writer is dead (this host) or that nobody wrote to for
    STALE_SECONDS (any host); returns their paths. A folder that cannot be listed or written is left alone."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        m = TEMPORARY_NAME.search(name)
        if m is None or (int(m.group(1)) == os.getpid() and m.group(2) in (None, HOST)):
            continue  # not a temporary file, or one of this process (being written)
        path = os.path.join(folder, name)
        try:
            stale = _writer_is_dead(int(m.group(1)), m.group(2)) or now - os.lstat(path).st_mtime > STALE_SECONDS
            if stale:
                if os.path.isdir(path) and not os.path.islink(path):  # a build's temporary folder
                    shutil.rmtree(path)
                else:
                    os.remove(path)
                removed.append(path)
        except OSError:
            continue
    return removed


def failure(e: BaseException, folder: str | None = None) -> str:
    """Why a write failed, in one line: the OS's reason (torch.save reports it inside a RuntimeError, or only
    an 'unexpected pos' when the disk is full), plus the free space where it is low."""
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror
    else:
        message = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        m = re.search(r"strerror: (.+)$", message)
        text = m.group(1) if m else f"{type(e).__name__}{': ' + message if message else ''}"
    if folder is not None:
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(folder or ".").free
            if free < LOW_SPACE:
                text += f"; {free / 2**20:.1f} MiB free there"
    return text
