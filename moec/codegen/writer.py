"""The only code that writes generated packages (and moec's other outputs) to disk.

* Builds the whole new package in a sibling directory (``.<name>.moec-new``) and swaps it into place
  with two renames (the old tree goes to ``.<name>.moec-old`` in between), so an interrupted build
  leaves either the old package or the new one, never a mix.
* Holds a lock (``.<name>.lock``, beside the package) while it works: a second build of the same
  package waits for the first. Under the lock any ``.moec-new`` / ``.moec-old`` sibling is left over
  from a killed build: the next build removes it, and restores ``.moec-old`` first if a build died
  between the two renames (the package is then missing).
* Keeps a ``MANIFEST`` (sha256 and path of every generated file).
* Refuses to overwrite a file whose bytes no longer match the manifest (a hand edit), a file it did not
  generate, or a symlink or directory where a generated file goes, unless ``force``; removes files it
  generated earlier but no longer emits only with ``prune``. Keeps everything else in the package
  directory as it is, symlinks as symlinks.
* Writes into the target of ``-o link`` (the link stays), gives a new package the umask's mode, and
  reports what the operating system refuses as a ``WriteError`` naming the path, not a traceback.
* Touches nothing when every byte is already right.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from moec.errors import WriteConflict, WriteError

MANIFEST = "MANIFEST"
LOCK_WAIT_S = 60.0  # a build takes well under a second; a lock held this long is a stuck build


@dataclass
class WriteResult:
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # generated earlier, no longer emitted, kept
    overwritten: list[str] = field(default_factory=list)  # hand-edited or foreign: needed --force

    @property
    def changed(self) -> bool:
        return bool(self.written or self.removed)

    def summary(self) -> str:
        """What a build did: ``3 files written, 9 unchanged``."""
        parts = [f"{_files(len(self.written))} written", f"{len(self.unchanged)} unchanged"]
        if self.removed:
            parts.append(f"{len(self.removed)} removed")
        if self.stale:
            parts.append(f"{len(self.stale)} stale (use --prune)")
        return ", ".join(parts)

    def preview(self) -> str:
        """What a build would do (``--check``): ``would write 2 files, remove 1 (26 unchanged)``."""
        parts = []
        plain = len(self.written) - len(self.overwritten)
        if plain:
            parts.append(f"write {_files(plain)}")
        if self.overwritten:
            parts.append("overwrite hand-edited " + ", ".join(self.overwritten))
        if self.removed:
            parts.append(f"remove {_files(len(self.removed))}")
        return "would " + ", ".join(parts) + f" ({len(self.unchanged)} unchanged)"


def _files(count: int) -> str:
    return "1 file" if count == 1 else f"{count} files"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_bytes(files: dict[str, bytes], kept: dict[str, str] | None = None) -> bytes:
    """sha256 and path of every generated file, plus ``kept`` stale entries (so --prune finds them)."""
    entries = {path: sha256(data) for path, data in files.items()} | (kept or {})
    lines = [f"{digest}  {path}" for path, digest in sorted(entries.items())]
    return ("\n".join(lines) + "\n").encode()


def read_manifest(root: Path) -> dict[str, str]:
    path = root / MANIFEST
    if not path.is_file():
        return {}
    entries = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if name:
            entries[name] = digest
    return entries


def plan_write(
    root: Path, files: dict[str, bytes], force: bool = False, prune: bool = False
) -> WriteResult:
    """What writing ``files`` to ``root`` would do; raises WriteConflict for hand edits / foreign
    files (unless ``force``), WriteError if the package cannot be read."""
    try:
        return _plan(Path(root), files, force, prune)
    except OSError as exc:
        raise WriteError(root, _reason(exc), "read") from None


def _plan(root: Path, files: dict[str, bytes], force: bool, prune: bool) -> WriteResult:
    old = read_manifest(root)
    stale = {p: old[p] for p in sorted(set(old) - set(files)) if (root / p).is_file()}
    files = {**files, MANIFEST: manifest_bytes(files, None if prune else stale)}
    result, conflicts = WriteResult(), []

    def conflict(path: str, why: str) -> None:
        if force:
            result.overwritten.append(path)
        else:
            conflicts.append(f"{root / path}: {why}")

    for path, data in files.items():
        target = root / path
        blocker = _blocker(root, path)
        if blocker:
            conflict(path, blocker)
            result.written.append(path)
            continue
        if not target.is_file():
            result.written.append(path)
            continue
        current = target.read_bytes()
        if current == data:
            result.unchanged.append(path)
            continue
        if path != MANIFEST:
            if path not in old:
                conflict(path, "exists but was not generated by moec")
            elif sha256(current) != old[path]:
                conflict(path, "edited by hand since it was generated")
        result.written.append(path)
    for path, digest in stale.items():
        if prune and not force and sha256((root / path).read_bytes()) != digest:
            conflicts.append(f"{root / path}: no longer generated, but edited by hand (not pruned)")
        (result.removed if prune else result.stale).append(path)
    if conflicts:
        raise WriteConflict(conflicts)
    return result


def _blocker(root: Path, path: str) -> str | None:
    """Why a generated file cannot simply be written at ``root/path`` (a symlink or a directory in
    its place, a file or a symlink where one of its folders goes), or None."""
    folder = root
    for part in Path(path).parts[:-1]:
        folder = folder / part
        if folder.is_symlink():
            return f"{folder.relative_to(root)} is a symlink (moec writes real folders)"
        if folder.exists() and not folder.is_dir():
            return f"{folder.relative_to(root)} is a file where moec writes a folder"
    target = root / path
    if target.is_symlink():
        return "is a symlink (moec writes real files)"
    if target.is_dir():
        return "is a directory where moec writes a file"
    return None


def write_package(
    root: Path, files: dict[str, bytes], force: bool = False, prune: bool = False
) -> WriteResult:
    """Write ``files`` (relative path → bytes) as the package at ``root``, atomically; under the
    lock, after cleaning up what a killed build left. WriteConflict for hand edits (unless
    ``force``), WriteError naming ``root`` for what the operating system refuses."""
    shown = root
    real = _package_dir(Path(root))
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        with _locked(real):
            _clean_leftovers(real)
            result = _plan(real, files, force, prune)
            if result.changed:
                _write(real, files, result)
        return result
    except OSError as exc:
        raise WriteError(shown, _reason(exc)) from None


def _package_dir(root: Path) -> Path:
    """The directory a package at ``root`` is written to: a symlink's target (the link stays)."""
    try:
        real = Path(os.path.realpath(root))
        cwd = Path.cwd().resolve()
        _check_parents(real)
    except OSError as exc:
        raise WriteError(root, _reason(exc)) from None
    if real == cwd or real in cwd.parents:
        # the swap renames the package directory: the shell's working directory would vanish
        raise WriteError(root, "it is the working directory or holds it; use a folder below it")
    if real.exists() and not real.is_dir():
        raise WriteError(root, "it is a file, not a package directory")
    return real


def _check_parents(path: Path) -> None:
    """NotADirectoryError naming the first existing folder above ``path`` that is a file."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"{parent} is not a directory")
            return


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``root``; the file is removed on release.

    A build that waited may lock a file its predecessor has just unlinked; it then locks afresh, so
    two builds never both hold the lock of one path."""
    lock = root.parent / f".{root.name}.lock"
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    errno.ETIMEDOUT, f"another moec build has held {lock} for {LOCK_WAIT_S:g} s"
                ) from None
            time.sleep(0.05)
            continue
        if _same_file(fd, lock):
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _staging(root: Path) -> Path:
    return root.parent / f".{root.name}.moec-new"


def _retired(root: Path) -> Path:
    return root.parent / f".{root.name}.moec-old"


def _clean_leftovers(root: Path) -> None:
    """Under the lock: remove what killed builds left beside ``root``, first putting the old
    package back if one died between the swap's two renames (``root`` missing, its old copy kept).

    Also removes ``.<name>.new-XXXXXXXX`` / ``.old-XXXXXXXX`` left by moec before the lock existed.
    """
    legacy = re.compile(rf"\.{re.escape(root.name)}\.(new|old)-[a-z0-9_]{{8}}")
    found = [p for p in root.parent.iterdir() if legacy.fullmatch(p.name)]
    found += [_staging(root), _retired(root)]
    found = [p for p in found if p.is_dir() and not p.is_symlink()]
    olds = [p for p in found if p.name.endswith(".moec-old") or ".old-" in p.name]
    if not root.exists() and olds:
        os.rename(max(olds, key=lambda p: p.stat().st_ctime), root)
    for leftover in found:
        if leftover.is_dir():  # not the one just put back
            shutil.rmtree(leftover)


def _write(root: Path, files: dict[str, bytes], result: WriteResult) -> None:
    kept = {p: d for p, d in read_manifest(root).items() if p in result.stale}
    files = {**files, MANIFEST: manifest_bytes(files, kept)}
    staging = _staging(root)
    try:
        if root.exists():
            # keep whatever is not ours (symlinks as links), and stale files unless pruned
            shutil.copytree(
                root, staging, symlinks=True, ignore=_ignore_removed(root, result.removed)
            )
        else:
            staging.mkdir()  # the umask's mode, as any new directory
        for path, data in files.items():
            target = staging / path
            _make_folders(staging, target.parent)
            if target.is_symlink() or target.is_file():
                target.unlink()  # write a new file, never through a link
            elif target.is_dir():
                shutil.rmtree(target)  # only with --force (plan_write refuses otherwise)
            target.write_bytes(data)
            if path.endswith((".sh", ".sbatch")):
                mode = target.stat().st_mode
                target.chmod(mode | (mode & 0o444) >> 2)  # executable where readable (the umask)
        _swap(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _make_folders(top: Path, folder: Path) -> None:
    """``mkdir -p folder`` below ``top``, replacing a symlink or a file on the way (``--force``)."""
    current = top
    for part in folder.relative_to(top).parts:
        current = current / part
        if current.is_symlink() or (current.exists() and not current.is_dir()):
            current.unlink()
        if not current.is_dir():
            current.mkdir()


def _ignore_removed(root: Path, removed: list[str]):
    removed = set(removed)

    def ignore(directory: str, names: list[str]) -> list[str]:
        folder = Path(os.path.relpath(directory, root))
        return [n for n in names if n == "__pycache__" or (folder / n).as_posix() in removed]

    return ignore


def _swap(staging: Path, root: Path) -> None:
    """Replace ``root`` by ``staging`` with two renames (the old tree is removed afterwards)."""
    if not root.exists():
        os.rename(staging, root)
        return
    retired = _retired(root)
    os.rename(root, retired)
    os.rename(staging, root)
    shutil.rmtree(retired, ignore_errors=True)


def write_file(path: Path, data: bytes) -> None:
    """Write one file atomically (a temporary sibling renamed over it), at the target of a symlink,
    with the umask's mode; WriteError naming ``path`` if the operating system refuses."""
    try:
        real = Path(os.path.realpath(path))
        if real.is_dir():
            raise IsADirectoryError(errno.EISDIR, "it is a directory")
        _check_parents(real)
        real.parent.mkdir(parents=True, exist_ok=True)
        tmp = real.with_name(f".{real.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, real)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    except OSError as exc:
        raise WriteError(path, _reason(exc)) from None


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def diff(root: Path, files: dict[str, bytes]) -> str:
    """A unified diff from the package on disk to ``files`` (MANIFEST included)."""
    try:
        return _diff(Path(root), files)
    except (OSError, UnicodeDecodeError) as exc:
        reason = _reason(exc) if isinstance(exc, OSError) else "not UTF-8 text"
        raise WriteError(root, reason, "read") from None


def _diff(root: Path, files: dict[str, bytes]) -> str:
    files = {**files, MANIFEST: manifest_bytes(files, None)}
    out = []
    for path, data in files.items():
        target = root / path
        old = target.read_text() if target.is_file() else ""
        new = data.decode()
        if old != new:
            out.extend(
                difflib.unified_diff(
                    old.splitlines(True), new.splitlines(True), f"a/{path}", f"b/{path}"
                )
            )
    return "".join(out)
