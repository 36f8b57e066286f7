"""The Hugging Face Hub: push an adapter (``model.push_to_hub`` / ``uti-peft push``) and errors a user can act on.

A pushed repo holds exactly what a saved adapter directory holds: ``adapter_config.json``,
``adapter_model.safetensors`` (the new rows only), ``token_space.json`` and the model card ``README.md``
(see `uti_peft.card`). Loading needs nothing of ours beyond ``import uti_peft``:
``PeftModel.from_pretrained(base, "org/name", revision=..., subfolder=...)`` and
``AutoPeftModelForCausalLM.from_pretrained("org/name")`` resolve the repo with huggingface_hub.

`install` (run at `import uti_peft`) adapts PEFT where it has no hook:

* ``PeftModel.push_to_hub``, for models carrying a row-extension adapter, uploads those four files in one
  commit. (transformers' generic ``push_to_hub``, which PEFT inherits, replaces the saved ``README.md`` by
  the repo's existing card or transformers' default one, so our card would never reach the Hub.)
* When PEFT cannot find ``adapter_config.json`` (``"Can't find 'adapter_config.json' at 'org/name'"`` for a
  missing repo, revision, file, an uncached repo offline, ...) the error says which of these it is, and an
  ``adapter_config.json`` naming a ``peft_type`` nobody registered says what to install or import.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Optional

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from peft.utils import CONFIG_NAME, PeftType

from .card import CARD_NAME, METADATA_KEY, card_facts, render_model_card
from .files import file_sha256, read_safetensors_header, rows_bytes_of_file
from .constants import DEFAULT_COMMIT_MESSAGE, TOKEN_SPACE_NAME
from .row_extension._compat import set_push_handler
from .row_extension.config import RowExtensionConfig, find_row_extension_adapter
from .constants import INPUT_ROWS_KEY, OUTPUT_ROWS_KEY, WEIGHTS_NAME
from .errors import AdapterNotFoundError, RowExtensionError, TokenSpaceError, WrongAdapterTypeError
from .paths import looks_like_path
from .token_space import TokenSpace

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, TOKEN_SPACE_NAME, CARD_NAME)
_MARK = "__uti_peft_hub__"


# ---------------------------------------------------------------------- the adapter folder
@dataclass
class AdapterFolder:
    """A validated adapter directory, ready to push."""

    path: str
    config: RowExtensionConfig
    rows_bytes: int
    hidden_size: int
    tensors: tuple[str, ...]

    @property
    def files(self) -> tuple[str, ...]:
        """The files a push uploads: `ADAPTER_FILES` and the LoRA adapter's, if any."""
        return (*ADAPTER_FILES, *_lora_files(self.config))


def check_adapter_folder(path: str | os.PathLike) -> AdapterFolder:
    """Check that ``path`` holds a complete, self-consistent row-extension adapter, rows only.

    Raises `AdapterNotFoundError` (missing files), `WrongAdapterTypeError` (another peft_type) or
    `RowExtensionError` (files that disagree), naming the file and the values.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise AdapterNotFoundError(f"{path!r} is not a directory")
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise AdapterNotFoundError(f"{path!r} has no {CONFIG_NAME}: not a saved PEFT adapter ({_listing(path)})")
    with open(config_file, encoding="utf-8") as f:
        peft_type = json.load(f).get("peft_type")
    check_peft_type(peft_type, where=config_file)
    config = RowExtensionConfig.from_pretrained(path)
    for name in (WEIGHTS_NAME, TOKEN_SPACE_NAME, *_lora_files(config)):
        if not os.path.isfile(os.path.join(path, name)):
            raise AdapterNotFoundError(f"{path!r} has no {name} ({_listing(path)})")
    space = TokenSpace.from_file(os.path.join(path, TOKEN_SPACE_NAME))
    if space.sha256() != config.token_space_sha256:
        raise TokenSpaceError(
            f"{path}: {TOKEN_SPACE_NAME} (sha256 {space.sha256()[:12]}…) differs from the token space in "
            f"{CONFIG_NAME} (sha256 {config.token_space_sha256[:12]}…)"
        )
    header = read_safetensors_header(os.path.join(path, WEIGHTS_NAME))
    tensors = tuple(sorted(k for k in header if k != "__metadata__"))
    where = os.path.join(path, WEIGHTS_NAME)
    unknown = sorted(set(tensors) - {INPUT_ROWS_KEY, OUTPUT_ROWS_KEY})
    if unknown or not tensors:
        raise RowExtensionError(
            f"{where} must hold {INPUT_ROWS_KEY!r} (and optionally {OUTPUT_ROWS_KEY!r}) only, found {list(tensors)}"
        )
    hidden_sizes = set()
    for key in tensors:
        shape = header[key]["shape"]
        if len(shape) != 2 or shape[0] != config.num_new_rows:
            raise RowExtensionError(
                f"{where}: {key} has shape {shape}, expected [{config.num_new_rows}, hidden] "
                f"(vocab_size - text_vocab_size = {config.vocab_size} - {config.text_vocab_size})"
            )
        hidden_sizes.add(shape[1])
    if len(hidden_sizes) != 1:
        raise RowExtensionError(f"{where}: the row tensors disagree on the hidden size: {sorted(hidden_sizes)}")
    return AdapterFolder(path, config, rows_bytes_of_file(where), hidden_sizes.pop(), tensors)


def _lora_files(config: RowExtensionConfig) -> tuple[str, ...]:
    """The files of the LoRA adapter saved with the rows (``lora/…``), if the adapter has one."""
    if not config.lora_adapter:
        return ()
    return tuple(f"{config.lora_adapter}/{name}" for name in (CONFIG_NAME, WEIGHTS_NAME))


def check_peft_type(peft_type: Any, *, where: str) -> None:
    """Raise `WrongAdapterTypeError` unless ``peft_type`` is ``ROW_EXTENSION``."""
    if str(getattr(peft_type, "value", peft_type)) != PeftType.ROW_EXTENSION.value:
        raise WrongAdapterTypeError(
            f"{where}: peft_type is {peft_type!r}, not 'ROW_EXTENSION': this is not a uti-peft row-extension "
            "adapter (load other PEFT adapters with PEFT directly)"
        )


# ---------------------------------------------------------------------- push
def push_adapter(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    create_pr: bool = False,
    token: Optional[str | bool] = None,
    path_in_repo: str = "",
    tags: Optional[list[str]] = None,
    api: Optional[HfApi] = None,
) -> CommitInfo:
    """Upload the adapter in ``folder`` to ``repo_id`` in one commit: exactly `ADAPTER_FILES` (and the two
    files of its LoRA adapter, if it has one).

    The repo is created if needed (``private`` applies only then), and so is the branch ``revision``. The
    folder's ``README.md`` is uploaded when it is a uti-peft card of these weights (its recorded sha256);
    otherwise (none, PEFT's generic card, or a card of other weights: only its provenance is kept) a fresh
    card is rendered for the upload. The folder is never modified. ``tags`` are added to the card.
    """
    adapter = check_adapter_folder(folder)
    card = _card_for_upload(adapter)
    if tags:
        card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
    api = api or HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
    prefix = f"{path_in_repo.strip('/')}/" if path_in_repo.strip("/") else ""
    operations = [
        CommitOperationAdd(path_in_repo=prefix + name, path_or_fileobj=os.path.join(adapter.path, name))
        for name in adapter.files
        if name != CARD_NAME
    ]
    operations.append(CommitOperationAdd(path_in_repo=prefix + CARD_NAME, path_or_fileobj=str(card).encode("utf-8")))
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
        token=token,
    )


def _card_for_upload(adapter: AdapterFolder) -> ModelCard:
    """The folder's card if it is ours and describes these weights; else a fresh one (keeping provenance)."""
    weights_sha256 = file_sha256(os.path.join(adapter.path, WEIGHTS_NAME))
    facts: dict[str, Any] = {}
    card_file = os.path.join(adapter.path, CARD_NAME)
    if os.path.isfile(card_file):
        try:
            card = ModelCard.load(card_file)
        except Exception:  # unreadable metadata: replaced by ours below
            card = None
        facts = card_facts(card) if card is not None else {}
        if facts and facts.get("adapter_sha256") in (None, weights_sha256):
            return card
    card = render_model_card(adapter.config, rows_bytes=adapter.rows_bytes, provenance=facts.get("provenance"))
    card.data[METADATA_KEY]["adapter_sha256"] = weights_sha256
    return card


def push_model(model: Any, repo_id: str, **kwargs: Any) -> CommitInfo:
    """``model.push_to_hub(repo_id, ...)`` of a model carrying a row-extension adapter: save it, then upload with
    `push_adapter` (our card and exactly the adapter's files; PEFT's inherited push would upload a generic card)."""
    kwargs.pop("max_shard_size", None)  # the rows are never sharded
    known = {"commit_message", "commit_description", "private", "token", "revision", "create_pr", "tags"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"push_to_hub() got unexpected keyword arguments {unknown}")
    # the tuner allows one row-extension adapter per model (plus, under "default", its LoRA)
    adapter_name, _ = find_row_extension_adapter(model.peft_config)
    with tempfile.TemporaryDirectory(prefix="uti-peft-push-") as tmp:
        model.save_pretrained(tmp)
        folder = tmp if adapter_name == "default" else os.path.join(tmp, adapter_name)
        path_in_repo = "" if adapter_name == "default" else adapter_name
        return push_adapter(folder, repo_id, path_in_repo=path_in_repo, **kwargs)


def use_request_timeout(seconds: Optional[float] = None) -> float:
    """Bound every request of huggingface_hub's shared HTTP client (``uti-peft`` commands call this).

    huggingface_hub 2.4 times out downloads (``HF_HUB_DOWNLOAD_TIMEOUT``, ``HF_HUB_ETAG_TIMEOUT``) but its
    shared client has no timeout for the other calls (create the repo, commit, upload), so a push to an
    endpoint that accepts and never answers hangs forever. This gives that client ``seconds`` (default:
    ``HF_HUB_DOWNLOAD_TIMEOUT``, 10 s, which huggingface_hub documents as the default for other requests too)
    per connect/read/write, unless a timeout is already set. huggingface_hub retries a timed-out request
    once, so a silent endpoint fails a push after about 2.5 x ``seconds``. Returns the timeout in force.
    """
    from huggingface_hub import get_session

    session = get_session()
    if session.timeout.read is None:  # an httpx(2) Timeout: the same class, with a value
        session.timeout = type(session.timeout)(float(seconds or constants.HF_HUB_DOWNLOAD_TIMEOUT))
    return session.timeout.read


# ---------------------------------------------------------------------- finding an adapter
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
            f"directory {local!r} has no {CONFIG_NAME}: not a saved PEFT adapter ({_listing(local)})"
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


def _listing(folder: str) -> str:
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




# ---------------------------------------------------------------------- PEFT integration
def _diagnosed(method, *, check_type: bool):
    """Wrap a PEFT classmethod that reads ``adapter_config.json`` so that its bare "Can't find" error says why."""

    @functools.wraps(method)
    def wrapper(cls, model_id, *args, **kwargs):
        if isinstance(model_id, (str, os.PathLike)) and (os.path.isdir(model_id) or looks_like_path(os.fspath(model_id))):
            # a local directory or a path: say what is wrong now, instead of after the Hub's retries
            locate_adapter(os.fspath(model_id), subfolder=kwargs.get("subfolder", args[0] if args else None))
        try:
            result = method(cls, model_id, *args, **kwargs)
        except ValueError as exc:
            if f"Can't find '{CONFIG_NAME}'" not in str(exc) or not isinstance(model_id, (str, os.PathLike)):
                raise
            hub_kwargs = dict(kwargs)
            if args:
                hub_kwargs.setdefault("subfolder", args[0])
            try:
                locate_adapter(os.fspath(model_id), **hub_kwargs)
            except AdapterNotFoundError as explained:
                raise explained from exc
            raise
        if check_type:
            _check_known_peft_type(result, model_id)
        return result

    setattr(wrapper, _MARK, method)
    return wrapper


def _check_known_peft_type(peft_type: Any, model_id: Any) -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    if peft_type == "ROW_EXTENSION":  # only reachable if uti_peft was imported but not registered
        hint = "call uti_peft.register()"
    else:
        hint = "upgrade peft, or install and import the package that defines it"
    raise WrongAdapterTypeError(
        f"{CONFIG_NAME} of {os.fspath(model_id)!r} has peft_type {peft_type!r}, which no installed PEFT method "
        f"provides: {hint}"
    )


def install() -> None:
    """Idempotently install the load diagnostics on PEFT's config loading, and ``PeftModel.push_to_hub``'s upload
    of our card (`uti_peft.row_extension._compat` calls `push_model` for models carrying the adapter)."""
    from peft.config import PeftConfigMixin

    set_push_handler(push_model)
    get_type = PeftConfigMixin.__dict__["_get_peft_type"].__func__
    if not hasattr(get_type, _MARK):
        PeftConfigMixin._get_peft_type = classmethod(_diagnosed(get_type, check_type=True))
    from_pretrained = PeftConfigMixin.__dict__["from_pretrained"].__func__
    if not hasattr(from_pretrained, _MARK):
        wrapped = _diagnosed(from_pretrained, check_type=False)
        setattr(wrapped, _MARK, from_pretrained)
        PeftConfigMixin.from_pretrained = classmethod(wrapped)
