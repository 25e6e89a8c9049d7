"""Where outputs go: a local path or an fsspec URL, written atomically, checked before work.

Every stage that writes (ingest, train, predict, evaluate, plots, synth) goes through
:func:`location` and :func:`atomic_output`, so a kill never leaves half a file under its
final name and ``s3://bucket/forecasts`` works wherever ``outputs/forecasts`` does.

>>> location("outputs/predictions")
PosixPath('outputs/predictions')
>>> is_url("s3://bucket/qs.zarr"), is_url("stores/qs.zarr")
(True, False)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from upath import UPath

from .errors import RunoffError

if TYPE_CHECKING:
    import fsspec


def is_url(store: str | Path) -> bool:
    """True for fsspec URLs such as ``s3://bucket/qs.zarr``."""
    return "://" in str(store)


def url_filesystem(store: str, storage_options: dict | None = None) -> tuple["fsspec.AbstractFileSystem", str]:
    """The fsspec filesystem of a store URL and the store's path inside it."""
    import fsspec

    fs, _, (root,) = fsspec.get_fs_token_paths(store, storage_options=storage_options)
    return fs, root


def location(where: str | Path | UPath, storage_options: dict | None = None) -> Path | UPath:
    """A local ``Path``, or for an fsspec URL a ``UPath`` bound to ``storage_options``
    (credentials and endpoint otherwise come from the usual environment variables)."""
    if isinstance(where, (Path, UPath)):
        return where
    return UPath(str(where), **(storage_options or {})) if is_url(where) else Path(where)


@contextlib.contextmanager
def atomic_output(path: str | Path | UPath) -> Iterator[Path]:
    """Yield a temporary local path; when the block succeeds, move it onto ``path``
    (rename beside it, or upload to a URL). A reader never sees half a file under its
    final name, and a failed write leaves nothing behind."""
    path = location(path)
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return
    with tempfile.TemporaryDirectory(prefix="runoff-") as folder:
        tmp = Path(folder) / path.name
        yield tmp
        path.fs.put_file(str(tmp), path.path)


def check_writable(folder: Path | UPath, option: str) -> None:
    """One clear error, before any work, when ``folder`` (a path or URL) cannot take files.

    A local folder that did not exist is removed again after the probe: the writers create
    it with their first file (:func:`atomic_output`), so a run that stops on a later error
    leaves no empty folder behind."""
    created = [] if is_url(str(folder)) else [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        for made in created:  # deepest first
            made.rmdir()
    except Exception as exc:  # OSError locally; object stores raise their clients' own errors
        why = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:160] or type(exc).__name__
        raise RunoffError(f"{option} {folder}: cannot write there ({why})") from None


def file_sha256(path: str | Path | UPath) -> str:
    """Hex sha256 of a file or URL (e.g. the checkpoint a forecast came from)."""
    h = hashlib.sha256()
    with location(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
