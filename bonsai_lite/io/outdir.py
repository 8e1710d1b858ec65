"""Output directories: checked before any work, staged under a unique hidden name, renamed into place.

Shared by every command that writes a model directory (`prune`'s export, `adapt`'s merge). The
rules: never write over an input; never delete anything we did not create (staging and swap-out
directories get unique hidden names, so a user's `OUT.tmp/` or `OUT.old/` is never touched); the
finished directory follows the umask like any directory the user creates (`mkdtemp` alone makes
it 0700).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from bonsai_lite.errors import BonsaiError

# Free space wanted beyond the planned bytes: filesystems slow down and fail late when nearly full,
# and headers, config and tokenizer files add a little: 2% plus 64 MiB.
DISK_HEADROOM_FACTOR, DISK_HEADROOM_BYTES = 1.02, 64 * 2**20


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open()` gives a new file under the current umask (mkstemp's files are 0600)."""
    return 0o666 & ~_umask()


def check_destination(out: Path, inputs: dict[str, Path | None], *, overwrite: bool, flag: str = "--out") -> None:
    """Refuse an output that is, or contains, an input; that is a file; or that exists without overwrite."""
    o = Path(out).resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        p = Path(path).resolve()
        if o == p or o in p.parents:
            raise BonsaiError(f"{flag} {out} {'is' if o == p else 'contains'} the {what} {path}; writing there would "
                              "replace it: choose another directory")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise BonsaiError(f"{flag} {out} exists and is not a directory; remove it or choose another output")
        if not overwrite:
            raise BonsaiError(f"{out} already exists; pass --overwrite to replace it or choose another {flag}")


def check_free_space(folder: Path, need: int, *, what: str) -> None:
    """Refuse before the work when `folder`'s filesystem lacks `need` bytes (plus headroom)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    want = int(need * DISK_HEADROOM_FACTOR) + DISK_HEADROOM_BYTES
    free = shutil.disk_usage(folder).free
    if free < want:
        raise BonsaiError(f"not enough disk space for {what}: about {fmt_size(want)} needed, {fmt_size(free)} free on "
                          f"{folder}; free some space or choose another directory")


def staging_dir(out: Path) -> Path:
    """A new, uniquely named hidden directory beside `out`, with the permissions the umask gives."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def publish(tmp: Path, out: Path, *, overwrite: bool) -> None:
    """Rename the finished `tmp` into place; an existing output is swapped out only at this point."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise BonsaiError(f"{out} appeared while writing; not replacing it (pass --overwrite)")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)
            raise
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    fsync_dir(out.parent)


def fmt_size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
