"""Writing outputs: atomic directories (written beside the target under a temporary name, renamed at the end),
and streaming bytes into a file (`write_all`, `copy_range`) without holding them in memory.

Shared by every command that writes a directory (`uti_peft.legacy`'s converters, `uti_peft.merge`): a failed
run leaves nothing behind, an existing target is replaced only with ``overwrite`` and only when it is empty or
holds the command's ``marker`` file (an earlier output of the same command), and never when it would replace
one of the command's inputs (``protected``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, BinaryIO, Iterator, Union

import torch

PathLike = Union[str, os.PathLike]
_COPY_BLOCK = 16 << 20


def is_within(path: str, parent: str) -> bool:
    """Whether ``path`` is ``parent`` or lies below it (symbolic links resolved)."""
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_target(
    target: str, overwrite: bool, marker: str, protected: tuple[str, ...], error: type[Exception] = ValueError
) -> None:
    """Raise ``error`` unless ``target`` may be (re)placed: see the module docstring."""
    for source in protected:
        if is_within(source, target):
            raise error(f"output directory {target} would replace the input {source}")
    if not os.path.lexists(target):
        return
    # what can never be replaced is said first, so that the hint "pass --overwrite" is given only where it works
    if os.path.islink(target) or not os.path.isdir(target):
        raise error(f"output {target} exists and is not a directory; refusing to replace it: choose another output")
    entries = os.listdir(target)
    if entries and marker not in entries:
        raise error(
            f"output directory {target} is not empty and holds no {marker}: refusing to replace what does not look "
            "like an earlier output, even with --overwrite; choose another output directory or remove it yourself"
        )
    if not overwrite:
        raise error(f"output directory {target} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_output(
    target: PathLike,
    *,
    overwrite: bool,
    marker: str,
    protected: tuple[str, ...] = (),
    error: type[Exception] = ValueError,
) -> Iterator[str]:
    """Yield a temporary directory beside ``target``; rename it to ``target`` if the block succeeds, else
    remove it (and any parent directories created for it)."""
    target = os.path.abspath(os.fspath(target))
    check_target(target, overwrite, marker, protected, error)
    parent = os.path.dirname(target)
    created = []
    probe = parent
    while not os.path.isdir(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the output's mode
        yield tmp
        check_target(target, overwrite, marker, protected, error)
        if os.path.lexists(target):
            old = f"{tmp}-replaced"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for directory in created:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise


def write_all(f: BinaryIO, data: Union[bytes, Any, torch.Tensor]) -> int:
    """Write all of ``data`` (bytes, a buffer, or a CPU tensor's raw bytes) to an unbuffered binary file, in
    pieces of at most 1 GiB (a single ``write`` may be short); returns the count written."""
    if isinstance(data, torch.Tensor):
        data = data.contiguous().reshape(-1).view(torch.uint8).numpy()
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += f.write(view[done : done + (1 << 30)])
    return done


def copy_range(src: PathLike, offset: int, f: BinaryIO, length: int) -> int:
    """Append ``length`` bytes of file ``src`` from ``offset`` to the unbuffered file ``f``: in the kernel
    (``copy_file_range``: the bytes never enter this process) where possible, else in 16 MiB blocks."""
    done = 0
    with open(src, "rb", buffering=0) as source:
        try:
            while done < length:
                n = os.copy_file_range(source.fileno(), f.fileno(), length - done, offset + done)
                if n == 0:
                    break
                done += n
        except (AttributeError, OSError):  # no copy_file_range here (platform, filesystem): plain reads
            source.seek(offset + done)
            while done < length:
                block = source.read(min(_COPY_BLOCK, length - done))
                if not block:
                    break
                done += write_all(f, block)
    if done != length:
        raise OSError(f"{src}: ended {length - done} bytes early (truncated while being copied?)")
    return done


def write_text_atomically(path: PathLike, text: str) -> None:
    """Temp file in the same directory + ``os.replace``, so a reader never sees half a file (a report, a token
    space); nothing is left behind on failure."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
