"""Writing results so that a result folder is complete or absent, never a mix of two runs.

Every file is written to a temporary name in its own directory and renamed into place
(``os.replace``), so no reader ever sees a truncated or 0-byte file. A run's folder is built in a
fresh sibling folder (``.NAME.partial-RUNID``) and moved into place when complete, with
``manifest.json`` written last (run id, kind, every file with its size and sha256): an interrupted
run (Ctrl-C, a full disk) leaves the earlier result as it was. An existing result is replaced only
when asked (``overwrite=True``, ``--overwrite``). Readers of a views folder call
:func:`check_run_folder`, which refuses a folder whose files do not match its manifest.

A hand-made views folder (PNGs + ``cameras.json``, no ``manifest.json``) is accepted with a note:
nothing says which run its files come from, but any folder dp360rt wrote carries a manifest.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

MANIFEST = "manifest.json"


class OutputError(OSError):
    """The output location cannot take a result (a file, unwritable, an earlier result, disk full).
    ``str(e)`` is the message; ``e.errno`` the cause's code when there is one."""

    def __init__(self, code: int | None, message: str):
        super().__init__(message)
        self.errno = code


def save_or_keep(save: Callable[[Path], Path], out: str | Path) -> Path:
    """``save(out)``; if that fails at the end of a run, save into a fresh temporary folder instead
    and raise :class:`OutputError` saying where the results are (finished work is never lost)."""
    try:
        return save(Path(out))
    except OutputError as e:
        if "kept in" in str(e):
            raise
        keep = Path(tempfile.mkdtemp(prefix="dp360rt-kept-")) / Path(out).name
        save(keep)
        raise OutputError(e.errno, f"{e} The results are kept in {keep}.") from e


class IncompleteRunError(ValueError):
    """A views folder whose files do not belong to one complete run (its manifest disagrees)."""


def _describe(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    return e.strerror or str(e)


def write_file_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary name next to ``path``, then rename it to ``path``.

    A failure (full disk, permissions) removes the temporary file and raises :class:`OutputError`
    naming ``path``; ``path`` keeps its earlier content, or stays absent."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}{p.suffix}")   # same suffix: writers pick formats by it
    try:
        write(tmp)
        if tmp.stat().st_size == 0:
            raise OSError(errno.EIO, "the writer produced an empty file")
        os.replace(tmp, p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OutputError):
            raise
        fix = "free some space on that disk or pass another --out" if e.errno == errno.ENOSPC \
            else "pass a writable --out location"
        raise OutputError(e.errno, f"cannot write {p}: {_describe(e)}. Fix: {fix}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_file_atomic`)."""
    return write_file_atomic(path, lambda t: t.write_text(text, encoding="utf-8"))


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Check, before any work, that ``path`` can receive a result folder: not a file, not an
    earlier result unless ``overwrite``, its parent writable. Creates nothing that stays."""
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise OutputError(errno.ENOTDIR, f"cannot write results to {d}: it is a file, not a directory. "
                          "Fix: pass a writable --out directory (a new or empty one)")
    if d.is_dir() and any(d.iterdir()) and not overwrite:
        raise OutputError(errno.EEXIST, f"{d} already holds files (an earlier result?); refusing to mix or replace "
                          "them. Fix: pass another --out directory, or --overwrite (overwrite=True) to replace it")
    parent = d.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=f".{d.name}.probe-", dir=parent))
        probe.rmdir()
    except OSError as e:
        raise OutputError(e.errno, f"cannot write results to {d}: {_describe(e)} in {parent}. "
                          "Fix: pass a writable --out directory") from e
    return d


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ResultDir:
    """A run's result folder, built aside and moved into place when complete.

    ``with ResultDir(out, kind="views") as r:`` write files into ``r.path`` (a fresh sibling
    folder), then ``r.commit()`` writes ``manifest.json`` last and moves the folder to ``out``
    (an earlier result there is replaced only with ``overwrite=True``). Leaving the block without
    ``commit`` (an error, Ctrl-C) deletes the partial folder; ``out`` is untouched. If the final
    move itself fails the finished files are kept and the error says where."""

    def __init__(self, out: str | Path, *, kind: str, overwrite: bool = False):
        self.out = check_output_dir(out, overwrite)
        self.kind, self.overwrite = kind, overwrite
        self.run_id = uuid.uuid4().hex
        self.out.absolute().parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-{self.run_id[:8]}-",
                                          dir=self.out.absolute().parent))
        self.committed = False

    def __enter__(self) -> "ResultDir":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if not self.committed and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self, **info: Any) -> Path:
        """Write ``manifest.json`` (run id, kind, ``info``, every file's size and sha256) and move
        the folder into place; returns the final path."""
        files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                 for f in sorted(self.path.iterdir()) if f.is_file() and f.name != MANIFEST}
        manifest = {"run_id": self.run_id, "kind": self.kind, "complete": True, **info, "files": files}
        write_text_atomic(self.path / MANIFEST, json.dumps(manifest, indent=1))
        old = None
        try:
            if self.out.exists():
                if any(self.out.iterdir()) and not self.overwrite:   # appeared while we ran
                    raise OutputError(errno.EEXIST, f"{self.out} received other files during the run")
                old = self.out.with_name(f".{self.out.name}.old-{self.run_id[:8]}")
                os.replace(self.out, old)
            os.replace(self.path, self.out)
        except OSError as e:
            if old is not None and not self.out.exists():
                os.replace(old, self.out)            # put the earlier result back
            self.committed = True                    # keep the finished files
            raise OutputError(e.errno, f"cannot move the finished results into {self.out}: {_describe(e)}. "
                              f"The results are kept in {self.path}. Fix: move that folder where you want it") from e
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


def check_run_folder(folder: str | Path, files: list[str]) -> dict | None:
    """Check that ``files`` (names inside ``folder``, with ``cameras.json``) belong to one
    complete run: listed in ``manifest.json`` with the same sizes and hashes. Returns the manifest,
    or None for a hand-made folder without one (accepted: nothing to check against). Raises
    :class:`IncompleteRunError` naming the first disagreement."""
    d = Path(folder)
    mp = d / MANIFEST
    if not mp.exists():
        return None
    try:
        manifest = json.loads(mp.read_text())
        listed = manifest["files"]
        complete = manifest.get("complete") is True
    except (ValueError, KeyError, TypeError) as e:
        raise IncompleteRunError(f"{mp} is unreadable ({e}). Fix: generate the views again into a new folder") from e
    fix = "Fix: generate the views again into a new folder (or delete manifest.json to use the files as they are)"
    if not complete:
        raise IncompleteRunError(f"{d} holds an incomplete run ({mp} says so). {fix}")
    for name in list(files) + ["cameras.json"]:
        entry = listed.get(name)
        p = d / name
        if entry is None:
            raise IncompleteRunError(f"{p} is not part of the run {manifest.get('run_id')} that {mp} describes. {fix}")
        if not p.exists() or p.stat().st_size != entry.get("bytes") or sha256_file(p) != entry.get("sha256"):
            raise IncompleteRunError(f"{p} differs from the run {manifest.get('run_id')} that {mp} describes "
                                     f"(another run's file, or changed). {fix}")
    return manifest
