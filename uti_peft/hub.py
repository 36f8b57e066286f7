"""The Hugging Face Hub: push an adapter (``model.push_to_hub`` / ``uti-peft push``) and errors a user can act on.

A pushed repo holds exactly what a saved adapter directory holds: ``adapter_config.json``,
``adapter_model.safetensors`` (the new rows only), ``token_space.json`` and the model card ``README.md``
(see `uti_peft.card`). Loading needs nothing of ours beyond ``import uti_peft``:
``PeftModel.from_pretrained(base, "org/name", revision=..., subfolder=...)`` and
``AutoPeftModelForCausalLM.from_pretrained("org/name")`` resolve the repo with huggingface_hub.

``PeftModel.push_to_hub`` of a model carrying a row-extension adapter comes here (`push_model`, registered with
`uti_peft.row_extension._compat` on import): transformers' generic ``push_to_hub``, which PEFT inherits, would
replace the saved ``README.md`` by the repo's existing card or transformers' default one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, constants
from peft.utils import PeftType

from .card import CARD_NAME, METADATA_KEY, card_facts, render_model_card
from .files import file_sha256, read_safetensors_header, rows_bytes_of_file
from .constants import CONFIG_NAME, DEFAULT_COMMIT_MESSAGE, TOKEN_SPACE_NAME
from .row_extension._compat import set_push_handler
from .row_extension.config import RowExtensionConfig, find_row_extension_adapter
from .constants import INPUT_ROWS_KEY, OUTPUT_ROWS_KEY, WEIGHTS_NAME
from .adapter_location import describe_folder
from .errors import AdapterNotFoundError, RowExtensionError, TokenSpaceError, WrongAdapterTypeError
from .token_space import TokenSpace

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, TOKEN_SPACE_NAME, CARD_NAME)


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
        raise AdapterNotFoundError(f"{path!r} has no {CONFIG_NAME}: not a saved PEFT adapter ({describe_folder(path)})")
    with open(config_file, encoding="utf-8") as f:
        peft_type = json.load(f).get("peft_type")
    check_peft_type(peft_type, where=config_file)
    config = RowExtensionConfig.from_pretrained(path)
    for name in (WEIGHTS_NAME, TOKEN_SPACE_NAME, *_lora_files(config)):
        if not os.path.isfile(os.path.join(path, name)):
            raise AdapterNotFoundError(f"{path!r} has no {name} ({describe_folder(path)})")
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


set_push_handler(push_model)  # PeftModel.push_to_hub of a model carrying the adapter comes to push_model
