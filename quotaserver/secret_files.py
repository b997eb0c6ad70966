"""Secrets at rest: the token file, the cookie secret and the SQLite files, owner-only.

A secret file the server creates is written with mode 0600 under umask 077, in a directory
made with mode 0700, through a new file opened with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and
renamed into place (a symlink planted at the path is replaced, never written through). A
secret file that already exists is trusted only if it is owned by the server's user (or
root), nobody but its owner can read or write it, it sits in a directory no one else can
write (owned by the server's user or root, not group- or world-writable) and it holds at
least :data:`MIN_SECRET_LENGTH` characters; otherwise start-up stops with a
:class:`ConfigError` that names the file and says why (exit 2).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Iterator

from .config import ConfigError

log = logging.getLogger(__name__)

MIN_SECRET_LENGTH = 16


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Files and directories created inside are for the owner only."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def write_secret(path: str, nbytes: int, key: str) -> str:
    """A new random secret in ``path`` (mode 0600), replacing any previous one."""
    value = secrets.token_urlsafe(nbytes)
    directory = os.path.dirname(path)
    temporary = f"{path}.{secrets.token_hex(4)}.new"
    try:
        with private_umask():
            if directory:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            _check_directory(path, key)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fd = os.open(temporary, flags, 0o600)
            try:
                with os.fdopen(fd, "w", encoding="ascii") as fh:
                    fh.write(value + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(temporary, path)  # rename: a symlink at path is replaced
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write {path}: {exc.strerror}") from None
    return value


def _trusted_owner(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


def _check_directory(path: str, key: str) -> None:
    """Refuse a secret in a directory someone else could write (they could swap it)."""
    directory = os.path.dirname(os.path.abspath(path))
    info = os.stat(directory)
    if not _trusted_owner(info.st_uid) or stat.S_IMODE(info.st_mode) & 0o022:
        raise ConfigError(
            f"{key}: {path} is in {directory}, which other users can write (owner uid "
            f"{info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}); keep it in a directory "
            "only the server's user can write (chmod 700)"
        )


def read_secret(path: str, key: str) -> str | None:
    """The secret in an existing file, checked; None if there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY)  # a symlink is judged by its target (fstat below)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, encoding="ascii", errors="replace") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{key}: {path} is not a regular file")
        if not _trusted_owner(info.st_uid):
            raise ConfigError(
                f"{key}: {path} is owned by uid {info.st_uid}, not by the server's user "
                f"(uid {os.geteuid()}); chown it (or delete it to have a new one generated)"
            )
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"{key}: {path} has mode {mode:04o}, so other users can read or change it; "
                f"run chmod 600 {path} (or delete it to have a new one generated)"
            )
        _check_directory(path, key)
        value = fh.read().strip()
    if len(value) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"{key}: {path} holds a secret of {len(value)} characters, fewer than "
            f"{MIN_SECRET_LENGTH}: too easy to guess; put a longer random one there "
            "(or delete the file to have one generated)"
        )
    return value


def read_or_create_secret(path: str, nbytes: int, key: str) -> tuple[str, bool]:
    """Read a checked secret file, or create it with mode 0600. Returns (secret, created)."""
    value = read_secret(path, key)
    if value is not None:
        return value, False
    return write_secret(path, nbytes, key), True


def private_sqlite_files(path: str) -> None:
    """Create the SQLite file owner-only, and make existing ones so.

    SQLite gives its -wal and -shm files the database file's permissions, so creating the
    database file with mode 0600 before SQLite opens it covers all three.
    """
    directory = os.path.dirname(path)
    try:
        with private_umask():
            if directory:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        for name in (path, path + "-wal", path + "-shm", path + "-journal"):
            try:
                mode = stat.S_IMODE(os.stat(name).st_mode)
            except FileNotFoundError:
                continue
            if mode & 0o077:
                os.chmod(name, mode & 0o700)
                log.warning("%s had mode %04o; made it owner-only (0600)", name, mode)
    except OSError as exc:
        raise ConfigError(f"database.url: cannot prepare {path}: {exc.strerror}") from None


def private_database_files(url: str) -> None:
    """For an SQLite ``database.url``: :func:`private_sqlite_files` on its path."""
    if not url.startswith("sqlite:"):
        return
    # sqlite:///relative/path.db or sqlite:////absolute/path.db, as playhouse reads them
    path = url.removeprefix("sqlite:").removeprefix("//")
    path = path[1:] if path.startswith("/") else path
    if path and path != ":memory:":
        private_sqlite_files(path)
