"""Where is an adapter? A local directory, or a Hub repo (through the cache, offline too) — and when it is not
found, which of the many reasons it is (no such directory or repo, no access, revision, file, an uncached repo
offline, a full model or a legacy checkpoint given as the adapter), said so that the user can act."""

from __future__ import annotations

import os
import re
from typing import Any, Optional

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .constants import CONFIG_NAME
from .errors import AdapterNotFoundError, BaseModelNotFoundError
from .paths import looks_like_path, missing_local_base


def check_recorded_base(adapter: Any, base: Optional[str]) -> None:
    """Raise `BaseModelNotFoundError` when an adapter loaded by itself (the auto classes) records a base written as
    a local path that does not exist here, naming both and what to do, instead of sending the path to the Hub."""
    if missing_local_base(base):
        where = os.fspath(adapter)
        raise BaseModelNotFoundError(
            f"{where!r}: {CONFIG_NAME} records the base {base!r} (base_model_name_or_path), a local path that does "
            "not exist here (the adapter or the base was moved, or saved on another machine). Load the base and pass "
            f"it: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), {where!r}), or set "
            f"base_model_name_or_path in {CONFIG_NAME} to the base's directory or Hub id"
        )


def locate_adapter(
    name_or_path: str,
    *,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    token: Optional[str | bool] = None,
    cache_dir: Optional[str | os.PathLike] = None,
    local_files_only: bool = False,
    **_: Any,
) -> str:
    """Path of the adapter's ``adapter_config.json`` (local directory or Hub repo, downloaded if needed).

    Raises `AdapterNotFoundError` saying what is missing and what to do: no such directory, no such repo
    (or no access), no such revision, a repo without ``adapter_config.json`` (with the subfolders that have
    one), or a repo that is not in the cache while offline.
    """
    local = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
    if os.path.isdir(local):
        config_file = os.path.join(local, CONFIG_NAME)
        if os.path.isfile(config_file):
            return config_file
        raise AdapterNotFoundError(
            f"directory {local!r} has no {CONFIG_NAME}: not a saved PEFT adapter ({describe_folder(local)})"
            + _subfolder_hint(_local_files(name_or_path), subfolder)
        )
    if looks_like_path(name_or_path):
        raise AdapterNotFoundError(
            f"no adapter directory {local!r} (it does not exist, and a path is not a Hub repo id)"
        )
    try:
        return hf_hub_download(
            name_or_path, CONFIG_NAME, subfolder=subfolder, revision=revision, token=token,
            cache_dir=cache_dir, local_files_only=local_files_only,
        )
    except Exception as exc:
        raise explain_hub_error(exc, name_or_path, subfolder=subfolder, revision=revision, token=token,
                                cache_dir=cache_dir, local_files_only=local_files_only) from exc


def locate_adapter_error(name_or_path: str, **hub_kwargs: Any) -> Optional[AdapterNotFoundError]:
    """The `AdapterNotFoundError` saying why ``name_or_path`` has no ``adapter_config.json``; None if it has one
    after all (the caller's own error then stands)."""
    try:
        locate_adapter(name_or_path, **hub_kwargs)
    except AdapterNotFoundError as explained:
        return explained
    return None


def explain_hub_error(
    exc: BaseException,
    repo_id: str,
    *,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    token: Optional[str | bool] = None,
    cache_dir: Optional[str | os.PathLike] = None,
    local_files_only: bool = False,
) -> AdapterNotFoundError:
    """Turn the huggingface_hub error behind a failed ``adapter_config.json`` lookup into an actionable one."""
    at = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    file = f"{subfolder}/{CONFIG_NAME}" if subfolder else CONFIG_NAME
    cause = _hub_cause(exc)
    endpoint = constants.ENDPOINT
    if isinstance(cause, HFValidationError):
        return AdapterNotFoundError(f"{repo_id!r} is neither an existing directory nor a valid Hub repo id ({cause})")
    if isinstance(cause, GatedRepoError):
        return AdapterNotFoundError(
            f"{repo_id!r} is a gated repo on {endpoint}: request access on its page, then log in "
            "(`hf auth login`) or pass token=..."
        )
    if isinstance(cause, RepositoryNotFoundError):
        return AdapterNotFoundError(
            f"no model repo {repo_id!r} on {endpoint} (or no access to it): check the id; for a private repo "
            "log in (`hf auth login`) or pass token=...; for a local adapter pass an existing directory"
        )
    if isinstance(cause, RevisionNotFoundError):
        return AdapterNotFoundError(f"{repo_id!r} has no revision {revision!r} on {endpoint} (a branch, tag or commit)")
    offline = local_files_only or constants.is_offline_mode()
    if offline or isinstance(cause, LocalEntryNotFoundError):
        return _explain_cache_miss(repo_id, file, subfolder, revision, cache_dir, offline)
    if isinstance(cause, EntryNotFoundError):
        files = _remote_files(repo_id, revision, token)
        return AdapterNotFoundError(
            f"{at} has no {file}: it is not a PEFT adapter" + (f" ({_describe(files)})" if files else "")
            + _subfolder_hint(files, subfolder)
        )
    return AdapterNotFoundError(f"cannot fetch {file} of {at} from {endpoint}: {type(cause).__name__}: {cause}")


def _explain_cache_miss(repo_id, file, subfolder, revision, cache_dir, offline) -> AdapterNotFoundError:
    cache = os.fspath(cache_dir or constants.HF_HUB_CACHE)
    why = "offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline else "the Hub is unreachable"
    repo_dir = os.path.join(cache, f"models--{repo_id.replace('/', '--')}")
    if not os.path.isdir(repo_dir):
        return AdapterNotFoundError(
            f"{repo_id!r} is not in the local Hub cache {cache} and {why}: download it once online "
            f"(`hf download {repo_id}`), or point HF_HUB_CACHE at the cache that has it"
        )
    refs_dir = os.path.join(repo_dir, "refs")
    refs = sorted(
        os.path.relpath(os.path.join(d, f), refs_dir) for d, _, fs in os.walk(refs_dir) for f in fs
    ) if os.path.isdir(refs_dir) else []
    snapshots_dir = os.path.join(repo_dir, "snapshots")
    wanted = revision or "main"
    commit = wanted if re.fullmatch(r"[0-9a-f]{40}", wanted) else None
    if commit is None and wanted in refs:
        with open(os.path.join(refs_dir, wanted), encoding="utf-8") as f:
            commit = f.read().strip()
    snapshot = os.path.join(snapshots_dir, commit) if commit else None
    if snapshot is None or not os.path.isdir(snapshot):
        return AdapterNotFoundError(
            f"revision {wanted!r} of {repo_id!r} is not in the local Hub cache {cache} (cached: "
            f"{', '.join(refs) or 'no named revision'}) and {why}"
        )
    files = _local_files(snapshot)
    return AdapterNotFoundError(
        f"the cached {repo_id!r} at revision {wanted!r} has no {file}: it is not a PEFT adapter ({_describe(files)})"
        + _subfolder_hint(files, subfolder)
    )


def _hub_cause(exc: BaseException) -> BaseException:
    """The first huggingface_hub error in the chain (PEFT re-raises them as a bare ValueError)."""
    seen = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (HFValidationError, EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)):
            return current
        if type(current).__module__.startswith("huggingface_hub"):
            return current
        current = current.__cause__ or current.__context__
    return exc


def _remote_files(repo_id: str, revision: Optional[str], token) -> list[str]:
    try:
        return HfApi().list_repo_files(repo_id, revision=revision, token=token)
    except Exception:
        return []


def _local_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(
        os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
        for d, _, fs in os.walk(folder)
        for f in fs
    )


def describe_folder(folder: str) -> str:
    """What a directory holds, for an error message (and what it looks like, if it is not an adapter)."""
    files = _local_files(folder)
    return _describe(files) if files else "it is empty"


def _describe(files: list[str]) -> str:
    shown = ", ".join(files[:8]) + (f", … ({len(files)} files)" if len(files) > 8 else "")
    hint = ""
    if any(f.endswith((".pt", ".bin")) and "trainable_rows" in f for f in files):
        hint = "; it looks like a legacy row checkpoint: convert it to an adapter first"
    elif "config.json" in files and any(f.endswith((".safetensors", ".bin")) for f in files):
        hint = "; it looks like a full model: pass it as the base model, not as the adapter"
    return f"files: {shown}{hint}"


def _subfolder_hint(files: list[str], subfolder: Optional[str]) -> str:
    found = sorted({f.rsplit("/", 1)[0] for f in files if f.endswith(f"/{CONFIG_NAME}")} - {subfolder})
    if not found:
        return ""
    return f"; adapters found in subfolders {found}: pass subfolder=..."
