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

import os
import tempfile
from typing import Any, Optional

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, constants

from .adapter_folder import AdapterFolder, check_adapter_folder
from .card import CARD_NAME, METADATA_KEY, card_facts, render_model_card
from .constants import DEFAULT_COMMIT_MESSAGE, WEIGHTS_NAME
from .files import file_sha256
from .row_extension._compat import set_push_handler
from .row_extension.config import find_row_extension_adapter


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
    # the model's first row-extension adapter (its LoRA, if any, comes with "default")
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
