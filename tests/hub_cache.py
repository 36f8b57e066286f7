"""Populate a Hugging Face Hub cache directory exactly as huggingface_hub lays it out, without a network.

::

    <cache>/models--<org>--<name>/
        blobs/<etag>                         file contents, one per distinct content
        snapshots/<commit>/<path>            relative symlinks into ../../blobs (a copy where symlinks fail)
        refs/<branch-or-tag>                 the commit a name points at

With ``HF_HUB_OFFLINE=1`` (and ``HF_HUB_CACHE`` pointing here) ``hf_hub_download(repo, file, revision=...)``
resolves a branch or tag through ``refs/``, a commit oid directly through ``snapshots/``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from huggingface_hub import constants

Content = Union[bytes, str, os.PathLike]


def repo_folder(cache_dir: Union[str, os.PathLike], repo_id: str, repo_type: str = "model") -> Path:
    return Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"


def commit_to_cache(
    cache_dir: Union[str, os.PathLike],
    repo_id: str,
    files: Mapping[str, Content],
    *,
    refs: tuple[str, ...] = ("main",),
    commit: Optional[str] = None,
) -> str:
    """Write one commit of ``repo_id`` into the cache and point ``refs`` (branches or tags) at it.

    ``files`` maps a path in the repo to bytes, text (a str), or a local file (a Path) to copy. Returns the commit oid (40 hex
    chars, derived from the content unless given).
    """
    contents = {path: _read(value) for path, value in files.items()}
    if commit is None:
        digest = hashlib.sha1()
        for path in sorted(contents):
            digest.update(path.encode() + b"\0" + hashlib.sha256(contents[path]).digest())
        commit = digest.hexdigest()
    root = repo_folder(cache_dir, repo_id)
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = root / "snapshots" / commit
    for path, content in contents.items():
        etag = hashlib.sha256(content).hexdigest()
        blob = root / "blobs" / etag
        if not blob.exists():
            blob.write_bytes(content)
        target = snapshot / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        try:
            target.symlink_to(os.path.relpath(blob, target.parent))
        except OSError:
            target.write_bytes(content)
    for ref in refs:
        ref_file = root / "refs" / ref
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(commit)
    return commit


def use_offline_cache(monkeypatch: Any, cache_dir: Union[str, os.PathLike]) -> None:
    """Point huggingface_hub at ``cache_dir`` offline (``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE``) for one test: the
    environment for what reads it later, and ``huggingface_hub.constants``, which read it at import."""
    for name, value in {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache_dir)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))


def folder_files(folder: Union[str, os.PathLike], prefix: str = "") -> dict[str, Path]:
    """All files below ``folder`` keyed by their repo path (``prefix`` + relative path, ``/``-separated)."""
    folder = Path(folder)
    return {
        prefix + p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _read(value: Content) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return Path(value).read_bytes()
