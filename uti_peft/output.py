"""Atomic output directories: written beside the target under a temporary name, renamed at the end.

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
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


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
    if not overwrite:
        raise error(f"output directory {target} already exists; pass --overwrite to replace it")
    if os.path.islink(target) or not os.path.isdir(target):
        raise error(f"output {target} exists and is not a directory; refusing to replace it")
    entries = os.listdir(target)
    if entries and marker not in entries:
        raise error(
            f"output directory {target} is not empty and holds no {marker}: refusing to replace what does not look "
            "like an earlier output; remove it yourself"
        )


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
