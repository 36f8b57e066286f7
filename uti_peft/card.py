"""The model card (``README.md``) of a row-extension adapter, built with huggingface_hub's `ModelCard`.

One card for a local directory and a Hub repo: `RowExtensionConfig.save_pretrained` writes it (so
``PeftModel.save_pretrained`` and ``push_to_hub`` carry it), and the legacy converter renders it with the
conversion's provenance and eval numbers.

Besides the standard Hub metadata (``base_model``, ``library_name: peft``, ``tags``, ``pipeline_tag``) the
YAML carries a ``uti_peft`` block with the facts of the card (sizes, token-space digest, provenance, eval
report), so that a card can be read back by a program (see `card_facts`).
"""

from __future__ import annotations

import functools
import json
import math
import os
from importlib import resources
from typing import Any, Callable, Optional

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .constants import CARD_NAME, WEIGHTS_NAME
from .files import file_sha256, rows_bytes_of_file
from .row_extension.config import AFTER_SAVE, RowExtensionConfig
from .token_space import TokenSpace

TEMPLATE_NAME = "adapter_card.md"
MERGED_TEMPLATE_NAME = "merged_card.md"
METADATA_KEY = "uti_peft"
LIBRARY_TAG = "uti-peft"
ADAPTER_REF_PLACEHOLDER = "<this repo id or adapter directory>"

_PROVENANCE_LABELS = {
    "source_checkpoint": "Source checkpoint",
    "source_sha256": "Source sha256",
    "source_format": "Source format",
    "row_start": "Row start",
    "row_end": "Row end",
    "dtype": "Dtype",
    "source_lora": "Source LoRA",
}


def template_path() -> str:
    """Path of the Jinja template (``model_cards/adapter_card.md``, packaged as ``uti_peft.model_cards``)."""
    return str(resources.files("uti_peft.model_cards") / TEMPLATE_NAME)


def render_model_card(
    config: RowExtensionConfig,
    *,
    rows_bytes: int,
    provenance: dict | None = None,
    eval_report: dict | None = None,
) -> ModelCard:
    """Render the card of an adapter.

    Args:
        config: The adapter's config (token space, sizes, ``base_model_name_or_path``).
        rows_bytes: Bytes of the rows the adapter stores (``adapter_model.safetensors`` tensor data; see
            `rows_bytes_of_file`).
        provenance: For converted checkpoints, e.g. ``{"source_checkpoint": path, "source_sha256": hex,
            "source_format": "trainable_rows.pt", "row_start": .., "row_end": .., "dtype": ..}``; any other
            keys are rendered too. The section is omitted when None or empty.
        eval_report: e.g. ``{"loss_mean": {"all": 2.1, "a2t": 1.9}, "counts": {"all": 100, "a2t": 40}}``: every
            dict-valued entry is a column of the eval table (one row per subset), other entries are listed
            below it. The section is omitted when None or empty.
    """
    space = config.get_token_space()
    provenance = _json_safe(provenance) if provenance else None
    eval_report = _json_safe(eval_report) if eval_report else None
    base_id = _hub_base_model(config, space)
    base_name = config.base_model_name_or_path or space.base_text_model or "BASE_MODEL"

    card_data = _card_metadata(config, space, base_id, rows_bytes=rows_bytes, provenance=provenance,
                               eval_report=eval_report)
    eval_metrics, eval_rows, eval_facts = _eval_table(eval_report or {})
    return ModelCard.from_template(
        card_data,
        template_path=template_path(),
        title=f"Row-extension adapter for {base_name}",
        base_model_link=f"[`{base_id}`](https://huggingface.co/{base_id})" if base_id else (
            f"`{base_name}`" if config.base_model_name_or_path else None
        ),
        base_model_name=base_name,
        adapter_ref=ADAPTER_REF_PLACEHOLDER,
        text_vocab_size=config.text_vocab_size,
        vocab_size=config.vocab_size,
        text_vocab_size_text=f"{config.text_vocab_size:,}",
        vocab_size_text=f"{config.vocab_size:,}",
        num_new_rows_text=f"{config.num_new_rows:,}",
        pad_token_id=config.pad_token_id,
        token_space_sha256=config.token_space_sha256,
        ranges=_range_rows(space),
        rows_bytes_text=_format_bytes(int(rows_bytes)),
        head_rows_text=(
            "trained rows stored (or shared with the input embedding when the base ties them)"
            if config.head_rows == "trained"
            else "not stored: on an untied base the mean of the head's text rows; a tied base shares the input rows"
        ),
        lora_adapter=config.lora_adapter,
        eval_metrics=eval_metrics,
        eval_rows=eval_rows,
        eval_facts=eval_facts,
        provenance=[
            {"name": _PROVENANCE_LABELS.get(k, k), "value": _cell(v, code=k in ("source_sha256", "source_checkpoint"))}
            for k, v in (provenance or {}).items()
        ],
        uti_peft_version=package_version("uti-peft"),
        peft_version=package_version("peft"),
    )


def _card_metadata(config: RowExtensionConfig, space: TokenSpace, base_id: Optional[str], *, rows_bytes: int,
                   provenance: Optional[dict], eval_report: Optional[dict]) -> ModelCardData:
    """The card's YAML metadata: Hub fields (base model, tags) and our facts under `METADATA_KEY`."""
    modality_tags = [m for m in space.modalities if m != "special"]
    tags = [LIBRARY_TAG, "peft", "row-extension", "vocabulary-extension", *modality_tags]
    if base_id:
        tags.append(f"base_model:adapter:{base_id}")
    facts: dict[str, Any] = {
        "peft_type": "ROW_EXTENSION",
        "text_vocab_size": config.text_vocab_size,
        "vocab_size": config.vocab_size,
        "num_new_rows": config.num_new_rows,
        "rows_bytes": int(rows_bytes),
        "head_rows": config.head_rows,
        "token_space_sha256": config.token_space_sha256,
        "modalities": modality_tags,
    }
    if config.lora_adapter:
        facts["lora_adapter"] = config.lora_adapter
    if provenance:
        facts["provenance"] = provenance
    if eval_report:
        facts["eval"] = eval_report
    return ModelCardData(
        base_model=base_id, library_name="peft", pipeline_tag="text-generation", tags=tags, **{METADATA_KEY: facts}
    )


def render_merged_card(
    config: RowExtensionConfig,
    facts: dict[str, Any],
    *,
    base_ref: str,
    adapter_ref: str,
    tied: bool,
    head_rows_stored: bool,
    weights_bytes: int,
) -> ModelCard:
    """The card of a merged checkpoint (`uti_peft.merge`): ``base_model`` with ``base_model_relation: merge``,
    the token-space table, and the adapter it came from with its sha256 (``facts``, also the YAML's
    ``uti_peft`` block)."""
    space = config.get_token_space()
    base_id = base_ref if _is_repo_id(base_ref) else _hub_base_model(config, space)
    modalities = [m for m in space.modalities if m not in ("special", "text")]
    card_data = ModelCardData(
        base_model=base_id,
        base_model_relation="merge" if base_id else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[LIBRARY_TAG, "row-extension", "vocabulary-extension", "merge", *modalities],
        **{METADATA_KEY: _json_safe(facts)},
    )
    ranges = _range_rows(space)
    for row in ranges:
        row["encodes"] = row["encodes"].replace(" (base rows, not stored)", "")
    return ModelCard.from_template(
        card_data,
        template_path=str(resources.files("uti_peft.model_cards") / MERGED_TEMPLATE_NAME),
        base_name=base_id or base_ref,
        adapter_ref=adapter_ref,
        adapter_is_repo=_is_repo_id(adapter_ref),
        facts=facts,
        ranges=ranges,
        vocab_size_text=f"{config.vocab_size:,}",
        text_vocab_size_text=f"{config.text_vocab_size:,}",
        num_new_rows_text=f"{config.num_new_rows:,}",
        head_text="the adapter's trained rows" if head_rows_stored
        else "the mean of the base lm_head's text rows (the adapter has no lm_head rows)",
        tied=tied,
        weights_text=_format_bytes(weights_bytes),
    )


def card_facts(card: ModelCard) -> dict[str, Any]:
    """The ``uti_peft`` metadata block of a card (``{}`` for a card that is not ours)."""
    facts = card.data.get(METADATA_KEY)
    return dict(facts) if isinstance(facts, dict) else {}


def write_model_card(
    save_directory: str | os.PathLike,
    config: RowExtensionConfig,
    *,
    provenance: dict | None = None,
    eval_report: dict | None = None,
    carry_over: bool = True,
    weights_sha256: str | Callable[[], str] | None = None,
) -> Optional[ModelCard]:
    """Write ``README.md`` for the adapter saved in ``save_directory`` (None if it holds no weights file).

    ``rows_bytes`` comes from ``adapter_model.safetensors``, whose sha256 is recorded in the card. With
    ``carry_over`` (what ``save_pretrained`` does), a previous uti-peft card in the directory donates what
    this call is not given: its provenance always (the rows' lineage survives re-saving), its eval report
    only when it was measured on these exact weights (same recorded sha256), so numbers never go stale.

    ``weights_sha256``: the sha256 of ``adapter_model.safetensors`` when the caller already has it (e.g. from
    verifying the bytes it wrote), so that the file is not read and hashed again; it is taken as given. A
    callable returning it is called once, when the digest is needed (after rendering when nothing is carried
    over), so that a hash still being computed elsewhere overlaps the rendering.
    """

    save_directory = os.fspath(save_directory)
    weights = os.path.join(save_directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        return None
    given = weights_sha256
    digest = functools.cache(given if callable(given) else lambda: given or file_sha256(weights))
    previous = _previous_facts(os.path.join(save_directory, CARD_NAME)) if carry_over else {}
    if provenance is None:
        provenance = previous.get("provenance")
    if eval_report is None and previous.get("adapter_sha256") is not None and previous["adapter_sha256"] == digest():
        eval_report = previous.get("eval")
    card = render_model_card(
        config, rows_bytes=rows_bytes_of_file(weights), provenance=provenance, eval_report=eval_report
    )
    card.data[METADATA_KEY]["adapter_sha256"] = digest()
    card.save(os.path.join(save_directory, CARD_NAME))
    return card


# ---------------------------------------------------------------------- helpers
def _previous_facts(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        return card_facts(ModelCard.load(path, ignore_metadata_errors=True))
    except Exception:  # an unreadable card is replaced, not fatal
        return {}


def _hub_base_model(config: RowExtensionConfig, space: TokenSpace) -> Optional[str]:
    """The base as a Hub id for ``base_model`` metadata: the config's base when it is a repo id (not a local
    path), else the token space's ``base_text_model``; None when neither is."""
    for candidate in (config.base_model_name_or_path, space.base_text_model):
        if candidate and _is_repo_id(candidate):
            return candidate
    return None


def _is_repo_id(name: str) -> bool:
    if os.path.isabs(name) or name.startswith(".") or os.path.exists(name) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _range_rows(space: TokenSpace) -> list[dict[str, Any]]:
    image = space.image_tokenizer or {}
    codec = space.audio_codec or {}
    audio_ranges = space.ranges_of("audio") if "audio" in space.modalities else []
    specials = space.special_tokens
    rows = []
    for name, r in space.ranges.items():
        modality = space.modality_of_id(r.start)
        if name == "TEXT":
            base = space.base_text_model
            encodes = f"text vocabulary of `{base}` (base rows, not stored)" if base else "text vocabulary (base rows, not stored)"
        elif name == "SPECIAL":
            named = ", ".join(f"`{t}`" for t in sorted(specials, key=specials.__getitem__))  # id order
            encodes = f"{len(specials)} named special tokens ({named}), the rest reserved" if specials else "special tokens"
        elif modality == "image":
            who = f"`{image['name_or_path']}`" if image.get("name_or_path") else "the image tokenizer"
            encodes = f"image tokenizer {who} codes" + (
                f" (codebook of {image['codebook_size']:,})" if isinstance(image.get("codebook_size"), int) else ""
            )
        elif modality == "audio":
            who = f"`{codec['name_or_path']}`" if codec.get("name_or_path") else "the audio codec"
            index = audio_ranges.index(r) if r in audio_ranges else 0
            encodes = f"audio codec {who}, codebook {index} of {len(audio_ranges)}"
            if isinstance(codec.get("codebook_size"), int):
                encodes += f" ({codec['codebook_size']:,} codes)"
            if codec.get("serialization") and index == 0:
                encodes += f"; serialization `{codec['serialization']}`"
        else:
            encodes = f"{modality} tokens"
        rows.append({"name": name, "start": r.start, "end": r.end, "size_text": f"{r.size:,}", "encodes": _escape(encodes)})
    return rows


def _eval_table(report: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]], list[dict[str, str]]]:
    metrics = [k for k, v in report.items() if isinstance(v, dict)]
    subsets: list[str] = []
    for metric in metrics:
        subsets.extend(s for s in report[metric] if s not in subsets)
    rows = [
        {"subset": _escape(str(s)), "values": [_cell(report[m].get(s)) for m in metrics]} for s in subsets
    ]
    facts = [{"name": _escape(str(k)), "value": _cell(v)} for k, v in report.items() if not isinstance(v, dict)]
    return [_escape(str(m)) for m in metrics], rows, facts


def _cell(value: Any, code: bool = False) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        text = "nan" if math.isnan(value) else f"{value:.4g}"
    elif isinstance(value, int) and not isinstance(value, bool):
        text = f"{value:,}" if abs(value) >= 10_000 else str(value)
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = str(value)
    text = _escape(text)
    return f"`{text}`" if code else text


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _json_safe(value: Any) -> Any:
    """Plain YAML/JSON types only (a ``torch.dtype`` or a Path becomes its string)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return _json_safe(value.item())  # 0-d tensors / numpy scalars
    return str(value)


def _format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            human = f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
            break
        size /= 1024
    return f"{human} ({n:,} bytes)"


def package_version(dist: str) -> str:
    """The installed version of distribution ``dist`` ("unknown" when it is not installed), for provenance."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


AFTER_SAVE.append(write_model_card)  # every saved row-extension config gets its card
