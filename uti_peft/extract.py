"""``uti-peft extract``: a vocabulary extension in a heavy form turned back into rows (the inverse of ``merge``).

Three sources are accepted, each against the ``BASE`` it extends:

* a **resized checkpoint** (safetensors, one file or shards): the legacy recipe's merged model, a fully fine-tuned
  one, a community release. Its embedding (and untied lm_head) rows ``[text_vocab_size, vocab_size)`` become the
  rows; its text rows must equal the base's and every other tensor must be the base's byte for byte;
* a **PEFT LoRA adapter** that saved the whole embedding / lm_head (``modules_to_save`` or
  ``save_embedding_layers``): the matrices' new rows become the rows and the LoRA weights are kept as the companion
  LoRA (``lora/``, as `uti_peft.add_lora` saves it);
* a **PEFT trainable-tokens adapter** (``TrainableTokensConfig`` or ``LoraConfig(trainable_token_indices=...)``):
  its ``trainable_tokens_delta`` rows at ``token_indices`` become the rows.

Like `uti_peft.merge`, nothing is instantiated: checkpoints are read tensor by tensor (safetensors headers, then
16 MiB slices), the module names come from the base built on the ``meta`` device, and peak memory is that of the
largest tensor compared (two, when one differs) plus the new rows. Everything is checked before the first byte is
written, and the adapter directory appears atomically. The result loads through every door with logits equal to
the source model's; ``extract(merge(base, adapter))`` gives back the adapter's rows byte for byte.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from peft import LoraConfig, PeftConfig
from peft.utils import load_peft_weights
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from transformers.utils import logging as hf_logging

from .card import _version, write_model_card
from .constants import CONFIG_NAME, INPUT_ROWS_KEY, OUTPUT_ROWS_KEY, PEFT_KEY_PREFIX, TOKEN_SPACE_NAME, WEIGHTS_NAME
from .errors import ExtractError, MergeError, RowExtensionError
from .files import read_safetensors_header
from .merge import _BASE_FILES, _TOKENIZER_FILES, _meta_model, _module_names, _Stored, read_checkpoint, resolve_dir
from .output import PathLike, atomic_output
from .paths import looks_like_path
from .row_extension.config import RowExtensionConfig
from .row_extension.layer import mean_rows
from .row_extension.lora import LORA_ADAPTER_NAME, check_lora_weights, write_lora
from .token_space import TokenSpace, resolve_token_space

CHECKPOINT, LORA, TRAINABLE_TOKENS = "resized checkpoint", "PEFT LoRA adapter", "PEFT trainable-tokens adapter"
_BLOCK = 16 << 20  # bytes compared (or rows read) at a time
# config fields a resized or fine-tuned checkpoint may change without changing what the weights compute
_FREE_CONFIG_FIELDS = {
    "vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "dtype", "torch_dtype", "transformers_version",
    "_name_or_path", "use_cache", "architectures",
}
_DELTA = "trainable_tokens_delta"
EXTRACTABLE = ("LORA", "TRAINABLE_TOKENS")  # the peft_type of the PEFT adapters extract reads
CHECKPOINT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
Rows = Callable[[int, int], torch.Tensor]  # rows [start, stop) of a matrix, read on demand


@dataclass
class ExtractPlan:
    """Everything `extract_adapter` writes, decided and checked before the first byte is."""

    base_ref: str
    source_ref: str
    base_dir: str
    source_dir: str
    kind: str  # CHECKPOINT, LORA or TRAINABLE_TOKENS
    space: TokenSpace
    rows: dict[str, torch.Tensor]  # INPUT_ROWS_KEY (and OUTPUT_ROWS_KEY when the base is untied and they are known)
    tied: bool
    lora: Optional[tuple[LoraConfig, dict[str, torch.Tensor]]] = None
    text_drift: float = 0.0  # the largest |source - base| over the text rows (0: identical)
    notes: list[str] = field(default_factory=list)  # what the user should know (printed by the CLI)


@dataclass
class _Base:
    """The base checkpoint: directory, config, tensors, and the names of its embedding / untied lm_head weights."""

    dir: str
    config: Any
    stored: dict[str, _Stored]
    embed: str
    head: Optional[str]  # None when tied (or headless)
    head_name: Optional[str]  # the lm_head weight's name, tied or not (None: headless)
    model: torch.nn.Module  # on the meta device

    def rows(self, name: str) -> Rows:
        return _slicer(self.stored[name], name)


# ---------------------------------------------------------------------- reading
def _slicer(item: _Stored, name: str) -> Rows:
    def rows(start: int, stop: int) -> torch.Tensor:
        with safe_open(item.shard, framework="pt") as st:
            return st.get_slice(name)[start:stop]

    return rows


def _read_base(base: PathLike) -> _Base:
    base_dir = resolve_dir(base, "base", _BASE_FILES)
    if not os.path.isfile(os.path.join(base_dir, "config.json")):
        raise ExtractError(f"base {base_dir!r} has no config.json (files: {sorted(os.listdir(base_dir))})")
    config = AutoConfig.from_pretrained(base_dir)
    stored = read_checkpoint(base_dir)
    model = _meta_model(config)
    embed, head_name, tied = _module_names(model)
    head = None if tied else head_name
    if tied:
        stored.pop(head_name, None)  # a tied head stored anyway: the embedding is the matrix
    for name in filter(None, (embed, head)):
        if name not in stored:
            raise ExtractError(f"base {base_dir!r}: the checkpoint holds no {name!r}")
    return _Base(base_dir, config, stored, embed, head, head_name, model)


def source_kind(source_dir: str) -> str:
    """What ``source_dir`` holds: `CHECKPOINT`, `LORA` or `TRAINABLE_TOKENS`; anything else is refused."""
    config_file = os.path.join(source_dir, CONFIG_NAME)
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            peft_type = json.load(f).get("peft_type")
        if peft_type == "LORA":
            return LORA
        if peft_type == "TRAINABLE_TOKENS":
            return TRAINABLE_TOKENS
        if peft_type == "ROW_EXTENSION":
            raise ExtractError(f"{config_file}: peft_type is 'ROW_EXTENSION': this is already a row-extension "
                               "adapter; nothing to extract")
        raise ExtractError(f"{config_file}: peft_type is {peft_type!r}; extract reads LoRA adapters with saved "
                           "embedding layers (modules_to_save / save_embedding_layers) and trainable-tokens adapters")
    if any(os.path.isfile(os.path.join(source_dir, n)) for n in CHECKPOINT_FILES):
        return CHECKPOINT
    bins = sorted(n for n in os.listdir(source_dir) if n.endswith((".bin", ".pt", ".pth")))
    raise ExtractError(
        f"source {source_dir!r} holds neither {CONFIG_NAME} (a PEFT adapter) nor {SAFE_WEIGHTS_NAME} / "
        f"{SAFE_WEIGHTS_INDEX_NAME} (a checkpoint)"
        + (f"; found {bins[:3]}: re-save it with save_pretrained(..., safe_serialization=True)" if bins else "")
    )


# ---------------------------------------------------------------------- the token space
def resolve_source_token_space(given: Union[None, TokenSpace, dict, PathLike], source_dir: str,
                               base_dir: str) -> TokenSpace:
    """``given``, else ``token_space.json`` beside the source, else inferred from the source tokenizer's tokens
    beyond the base tokenizer's (`infer_token_space`)."""
    space = resolve_token_space(given, source_dir, must_agree=True)
    return space if space is not None else infer_token_space(source_dir, base_dir)


_IMAGE_NAME = re.compile(r"^<\|img_(\d+)\|>$")
_AUDIO_NAME = re.compile(r"^<\|aud(\d+)_(\d+)\|>$")
_UNNAMED_SPECIAL = re.compile(r"^<\|special_(\d+)\|>$")


def infer_token_space(source_dir: str, base_dir: str) -> TokenSpace:
    """A token space built from the tokens the source's tokenizer has beyond the base's.

    ``text_vocab_size`` is the base tokenizer's length and ``vocab_size`` the source tokenizer's. Tokens named as
    `uti_peft.tokenizer` names them (``<|img_7|>``, ``<|aud2_5|>``) make the IMAGE and AUDIO_CB ranges; every other
    new token is a named special token of the SPECIAL range. Each range must be one contiguous run of ids, codes in
    order; otherwise the ranges cannot be inferred and `ExtractError` asks for ``--token-space``.
    """
    source_tok, base_tok = _tokenizer(source_dir, "source"), _tokenizer(base_dir, "base")
    text, total = len(base_tok), len(source_tok)
    where = f"the tokenizer in {source_dir}"
    if total <= text:
        raise ExtractError(f"{where} has {total} tokens, no more than the base tokenizer's {text}: the source adds no "
                           f"tokens, so it has no new rows to extract (pass --token-space if it does)")
    names = source_tok.convert_ids_to_tokens(list(range(text, total)))
    runs: list[tuple[str, int, int]] = []  # (range name, start, end)
    specials: dict[str, int] = {}
    for token_id, name in zip(range(text, total), names):
        range_name, code = _classify(name)
        if runs and runs[-1][0] == range_name:
            runs[-1] = (range_name, runs[-1][1], token_id)
        elif any(r[0] == range_name for r in runs):
            raise ExtractError(f"cannot infer the token space from {where}: {range_name} tokens are not one run of ids "
                               f"(id {token_id} is {name!r}); pass --token-space")
        else:
            runs.append((range_name, token_id, token_id))
        start = runs[-1][1]
        if code is not None and code != token_id - start:
            raise ExtractError(f"cannot infer the token space from {where}: id {token_id} is {name!r} but it is code "
                               f"{token_id - start} of {range_name}; pass --token-space")
        if range_name == "SPECIAL" and not _UNNAMED_SPECIAL.match(name):
            specials[name] = token_id
    ranges = {"TEXT": {"start": 0, "end": text - 1, "size": text}}
    ranges.update({n: {"start": s, "end": e, "size": e - s + 1} for n, s, e in runs})
    data: dict[str, Any] = {"version": "uti_v1", "text_vocab_size": text, "special_tokens": specials,
                            "ranges": ranges, "vocab_size_total": total}
    if "IMAGE" in ranges:
        data["image_tokenizer"] = {"codebook_size": ranges["IMAGE"]["size"]}
    audio = [r["size"] for n, r in ranges.items() if n.startswith("AUDIO_CB")]
    if audio:
        data["audio_codec"] = {"n_codebooks": len(audio), **({"codebook_size": audio[0]} if len(set(audio)) == 1 else {})}
    try:
        return TokenSpace(data, source=f"inferred from {where}")
    except RowExtensionError as exc:
        raise ExtractError(f"cannot infer the token space from {where} ({exc}); pass --token-space") from None


def _classify(name: str) -> tuple[str, Optional[int]]:
    """The range a new token's name puts it in, and its code there (None: a special token)."""
    if match := _IMAGE_NAME.match(name):
        return "IMAGE", int(match.group(1))
    if match := _AUDIO_NAME.match(name):
        return f"AUDIO_CB{match.group(1)}", int(match.group(2))
    return "SPECIAL", None


def _tokenizer(directory: str, what: str) -> Any:
    reason = "it has no tokenizer files"
    if any(os.path.isfile(os.path.join(directory, name)) for name in _TOKENIZER_FILES):
        try:
            return AutoTokenizer.from_pretrained(directory)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    raise ExtractError(f"no token space: the source has no {TOKEN_SPACE_NAME} and the {what} {directory!r} has no "
                       f"tokenizer to infer one from ({reason}); pass --token-space")


# ---------------------------------------------------------------------- comparing
def _max_drift(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """The largest ``|a - b|`` (NaN/Inf mismatches count as infinite) and the row where it is."""
    diff = (a.double() - b.double()).abs().nan_to_num(nan=math.inf)
    diff[(a == b) | (a.isnan() & b.isnan())] = 0  # equal values, infinities and NaNs included, do not drift
    per_row = diff.amax(dim=1) if diff.dim() == 2 else diff.reshape(1, -1).amax(dim=1)
    row = int(per_row.argmax())
    return float(per_row[row]), row


def _text_drift(source: Rows, base: Rows, text: int, hidden: int, itemsize: int) -> tuple[float, int]:
    """The largest drift of the source's text rows from the base's, read 16 MiB at a time."""
    worst, where = 0.0, 0
    step = max(1, _BLOCK // (hidden * itemsize))
    for start in range(0, text, step):
        a, b = source(start, min(start + step, text)), base(start, min(start + step, text))
        if torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
            continue
        drift, row = _max_drift(a, b)
        if drift > worst:
            worst, where = drift, start + row
    return worst, where


def _check_text_rows(what: str, name: str, source: Rows, base: _Base, base_name: str, text: int,
                     max_drift: float, dtype: str) -> float:
    """Refuse text rows that drifted from the base's more than ``max_drift``; return the largest drift."""
    base_dtype = base.stored[base_name].entry["dtype"]
    if dtype != base_dtype:
        raise ExtractError(f"{what}: {name} is {dtype} but the base's {base_name} is {base_dtype}: the text rows "
                           "cannot be compared (convert the source to the base's dtype first)")
    hidden = base.stored[base_name].entry["shape"][1]
    itemsize = torch.empty(0, dtype=_DTYPE_OF[dtype]).element_size()
    drift, row = _text_drift(source, base.rows(base_name), text, hidden, itemsize)
    if drift > max_drift:
        raise ExtractError(
            f"{what}: {name} rows 0..{text - 1} (the text rows) differ from the base's {base_name}: largest "
            f"difference {drift:.6g} at token id {row}, tolerance --max-text-drift {max_drift:g}; this is not a "
            "vocabulary extension of this base (or pass --max-text-drift to accept the stated drift)"
        )
    return drift


_DTYPE_OF = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _same_bytes(a: _Stored, b: _Stored) -> bool:
    """Whether two stored tensors have the same bytes, compared 16 MiB at a time."""
    if a.nbytes != b.nbytes:
        return False
    with open(a.shard, "rb", buffering=0) as fa, open(b.shard, "rb", buffering=0) as fb:
        fa.seek(a.offset)
        fb.seek(b.offset)
        left = a.nbytes
        while left:
            n = min(_BLOCK, left)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True


def _describe_change(name: str, a: _Stored, b: _Stored) -> str:
    if (a.entry["dtype"], a.entry["shape"]) != (b.entry["dtype"], b.entry["shape"]):
        return (f"{name} ({b.entry['dtype']} {b.entry['shape']} in the base, {a.entry['dtype']} {a.entry['shape']} "
                "in the source)")
    with safe_open(a.shard, framework="pt") as sa, safe_open(b.shard, framework="pt") as sb:
        drift, _ = _max_drift(sa.get_tensor(name).reshape(1, -1), sb.get_tensor(name).reshape(1, -1))
    return f"{name} (max |difference| {drift:.6g})"


# ---------------------------------------------------------------------- sources
def _plan_checkpoint(base: _Base, source_dir: str, space: TokenSpace, max_drift: float,
                     progress: Optional[bool]) -> ExtractPlan:
    """Rows of a resized checkpoint: its config, tensor names and every non-vocabulary tensor must be the base's."""
    config = AutoConfig.from_pretrained(source_dir)
    _check_config(base, config, source_dir)
    stored = read_checkpoint(source_dir)
    vocab_names = {base.embed, base.head_name} - {None}
    if base.head is None and base.head_name:
        stored.pop(base.head_name, None)  # a tied head stored anyway: the embedding is the matrix
    others = sorted(set(base.stored) - vocab_names)
    missing = sorted(set(base.stored) - set(stored))
    extra = sorted(set(stored) - set(base.stored))
    if missing or extra:
        raise ExtractError(f"source {source_dir!r} is not the base's architecture: tensors missing {missing[:5]}"
                           f"{' …' if len(missing) > 5 else ''}, tensors the base lacks {extra[:5]}"
                           f"{' …' if len(extra) > 5 else ''}")
    text, total = space.text_vocab_size, space.vocab_size
    rows, drift = {}, 0.0
    for key, name in ((INPUT_ROWS_KEY, base.embed), (OUTPUT_ROWS_KEY, base.head)):
        if name is None:
            continue
        item = stored[name]
        where = f"{os.path.relpath(item.shard, source_dir)} in {source_dir}"
        _check_vocab_shape(where, name, item.entry["shape"], base, name, space)
        drift = max(drift, _check_text_rows(where, name, _slicer(item, name), base, name, text, max_drift,
                                            item.entry["dtype"]))
        rows[key] = _slicer(item, name)(text, total).clone()
    changed = _changed_tensors(base, stored, others, progress)
    if changed:
        raise ExtractError(
            f"source {source_dir!r} is not a vocabulary extension of base {base.dir!r}: {len(changed)} tensor(s) "
            f"besides the embedding and lm_head changed: {'; '.join(changed[:5])}{' …' if len(changed) > 5 else ''}"
        )
    return ExtractPlan("", "", base.dir, source_dir, CHECKPOINT, space, rows, base.head is None, text_drift=drift)


def _check_config(base: _Base, config: Any, source_dir: str) -> None:
    """The source's config must describe the base's architecture (vocabulary size, ids and dtype aside)."""
    where = os.path.join(source_dir, "config.json")
    if config.model_type != base.config.model_type:
        raise ExtractError(f"{where}: model_type is {config.model_type!r} but the base's is "
                           f"{base.config.model_type!r}: not an extension of this base")
    ours, theirs = (getattr(c.get_text_config(), "hidden_size", None) for c in (base.config, config))
    if ours != theirs:
        raise ExtractError(f"{where}: hidden_size is {theirs} but the base's is {ours}: not an extension of this base")
    a, b = _comparable(base.config.to_dict()), _comparable(config.to_dict())
    differ = [f"{k}: {a.get(k, '<unset>')!r} in the base, {b.get(k, '<unset>')!r} in the source"
              for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if differ:
        raise ExtractError(f"{where} differs from the base's config: {'; '.join(differ[:5])}")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config's fields, nested text configs flattened, without those a resize may change."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and key.endswith("_config"):
            flat.update({f"{key}.{k}": v for k, v in _comparable(value).items()})
        elif key not in _FREE_CONFIG_FIELDS:
            flat[key] = value
    return flat


def _check_vocab_shape(where: str, name: str, shape: list[int], base: _Base, base_name: str,
                       space: TokenSpace) -> None:
    """A source matrix must be ``[vocab_size, hidden]`` and hold more rows than the text vocabulary."""
    base_shape = base.stored[base_name].entry["shape"]
    text, total = space.text_vocab_size, space.vocab_size
    if len(shape) != 2 or shape[1] != base_shape[1]:
        raise ExtractError(f"{where}: {name} has shape {shape} but the base's {base_name} has {base_shape} "
                           f"(hidden size {base_shape[1]}): not an extension of this base")
    if base_shape[0] < text:
        raise ExtractError(f"base {base.dir!r}: {base_name} has {base_shape[0]} rows, fewer than the token space's "
                           f"text_vocab_size {text} ({space.source})")
    if shape[0] <= text:
        raise ExtractError(f"{where}: {name} has {shape[0]} rows, no more than the token space's text_vocab_size "
                           f"{text}: the source has no new rows to extract")
    if shape[0] != total:
        raise ExtractError(f"{where}: {name} has {shape[0]} rows but the token space ({space.source}) has "
                           f"vocab_size_total {total}; pass the token space the source was resized for")


def _changed_tensors(base: _Base, stored: dict[str, _Stored], names: list[str], progress: Optional[bool]) -> list[str]:
    """The tensors among ``names`` whose bytes differ between the source and the base, described."""
    total = sum(stored[n].nbytes for n in names)
    disable = not hf_logging.is_progress_bar_enabled() if progress is None else not progress
    changed = []
    with hf_logging.tqdm(total=total, desc="Comparing with the base", unit="B", unit_scale=True,
                         disable=disable) as bar:
        for name in names:
            if not _same_bytes(stored[name], base.stored[name]):
                changed.append(_describe_change(name, stored[name], base.stored[name]))
            bar.update(stored[name].nbytes)
    return changed


def _plan_peft(base: _Base, source_dir: str, kind: str, space: TokenSpace, max_drift: float) -> ExtractPlan:
    """Rows of a PEFT adapter: full embedding / lm_head matrices, or trainable-token deltas; LoRA kept."""
    config = PeftConfig.from_pretrained(source_dir)
    try:
        weights = load_peft_weights(source_dir, device="cpu")  # safetensors, or .bin with weights_only=True
    except Exception as exc:
        raise ExtractError(f"{source_dir}: cannot read the adapter weights ({exc})") from exc
    where = f"{source_dir} ({os.path.basename(_weights_file(source_dir))})"
    paths = {base.embed.removesuffix(".weight"): INPUT_ROWS_KEY}
    if base.head_name:
        paths[base.head_name.removesuffix(".weight")] = OUTPUT_ROWS_KEY
    lora, matrices, deltas = {}, {}, {}
    for key, tensor in sorted(weights.items(), key=lambda item: ".modules_to_save." in item[0]):
        relative = key.removeprefix(PEFT_KEY_PREFIX)
        if ".original_module." in relative:
            continue  # the module modules_to_save replaced: the resized base's own, which the model does not use
        module = re.sub(r"\.(modules_to_save(\.[^.]+)?|token_adapter)(?=\.)", "", relative).rsplit(".", 1)[0]
        if ".lora_" in relative:
            if relative.partition(".lora_")[0] in paths:
                raise ExtractError(f"{where}: {key} is a LoRA of the vocabulary matrix {relative.partition('.lora_')[0]!r}:"
                                   " it changes the text rows too; not a vocabulary extension")
            lora[key] = tensor
        elif relative.endswith(f".{_DELTA}") and module in paths:
            deltas[paths[module]] = (key, tensor)
        elif relative.endswith(".weight") and module in paths:
            matrices[paths[module]] = (key, tensor)  # a modules_to_save copy (sorted last) wins over a plain save
        else:
            raise ExtractError(f"{where}: {key} {list(tensor.shape)} is neither a LoRA weight nor the embedding / "
                               "lm_head: not a vocabulary extension")
    if base.head is None and INPUT_ROWS_KEY in matrices and OUTPUT_ROWS_KEY not in matrices:
        _check_tied_copy(config, base, where)
    if kind == TRAINABLE_TOKENS or deltas:
        rows, drift, notes = _rows_from_deltas(base, config, deltas, matrices, where, space, max_drift)
    else:
        rows, drift, notes = _rows_from_matrices(base, matrices, where, space, max_drift)
    plan = ExtractPlan("", "", base.dir, source_dir, kind, space, rows, base.head is None, text_drift=drift,
                       notes=notes)
    if lora:
        check_lora_weights(lora, base.model, source_dir)
        plan.lora = (_companion_config(config), lora)
    return plan


def _check_tied_copy(config: Any, base: _Base, where: str) -> None:
    """On a tied base, a ``modules_to_save`` copy of the embedding unties it from the head (unless
    ``ensure_weight_tying``): PEFT's head then keeps the rows of the base the user resized, which no file holds."""
    saved = getattr(config, "modules_to_save", None) or ()
    embed = base.embed.removesuffix(".weight")
    if any(embed == m or embed.endswith(f".{m}") for m in saved) and not getattr(config, "ensure_weight_tying", False):
        raise ExtractError(
            f"{where}: modules_to_save copies the embedding of a tied base without ensure_weight_tying, so under PEFT "
            "the lm_head keeps the new rows of the base you resized, which the adapter does not hold; save the "
            "lm_head too (modules_to_save=['embed_tokens', 'lm_head']) or train with ensure_weight_tying=True"
        )


def _weights_file(source_dir: str) -> str:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if os.path.isfile(os.path.join(source_dir, name)):
            return os.path.join(source_dir, name)
    return source_dir


def _rows_from_matrices(base: _Base, matrices: dict, where: str, space: TokenSpace,
                        max_drift: float) -> tuple[dict[str, torch.Tensor], float, list[str]]:
    """The new rows of saved embedding / lm_head matrices, their text rows checked against the base's."""
    if INPUT_ROWS_KEY not in matrices:
        raise ExtractError(f"{where}: the adapter holds no embedding matrix ({base.embed}; found "
                           f"{sorted(k for k, _ in matrices.values()) or 'only LoRA weights'}): save it with "
                           "modules_to_save=['embed_tokens', 'lm_head'] or save_embedding_layers=True")
    text, drift, rows = space.text_vocab_size, 0.0, {}
    for role, (key, tensor) in matrices.items():
        base_name = base.embed if role == INPUT_ROWS_KEY or base.head is None else base.head
        _check_vocab_shape(where, key, list(tensor.shape), base, base_name, space)
        dtype = {v: k for k, v in _DTYPE_OF.items()}.get(tensor.dtype, str(tensor.dtype))
        drift = max(drift, _check_text_rows(where, key, lambda s, e, t=tensor: t[s:e], base, base_name, text,
                                            max_drift, dtype))
        rows[role] = tensor[text:].clone()
    if base.head is None and OUTPUT_ROWS_KEY in rows:
        head = rows.pop(OUTPUT_ROWS_KEY)
        if not torch.equal(head, rows[INPUT_ROWS_KEY]):
            raise ExtractError(f"{where}: the base ties its lm_head to its embedding but the adapter's lm_head rows "
                               f"{text}.. differ from its embedding rows: they cannot share one matrix")
    notes = []
    if base.head is not None and OUTPUT_ROWS_KEY not in rows:
        notes.append(_MEAN_HEAD_NOTE)
    return rows, drift, notes


_MEAN_HEAD_NOTE = ("the source holds no lm_head rows (PEFT took them from the base you resized): the adapter's head "
                   "rows are the mean of the base's text rows (head_rows='mean')")


def _rows_from_deltas(base: _Base, config: Any, deltas: dict, matrices: dict, where: str, space: TokenSpace,
                      max_drift: float) -> tuple[dict[str, torch.Tensor], float, list[str]]:
    """The rows of trainable-token deltas at the config's ``token_indices`` (which must cover every new id; any
    text id among them must hold the base's row)."""
    if matrices:
        raise ExtractError(f"{where}: holds both trainable-token deltas and whole matrices "
                           f"{sorted(k for k, _ in matrices.values())}; expected one or the other")
    if INPUT_ROWS_KEY not in deltas:
        raise ExtractError(f"{where}: no trainable_tokens_delta for the embedding ({base.embed})")
    text, total = space.text_vocab_size, space.vocab_size
    rows, drift = {}, 0.0
    for role, (key, delta) in deltas.items():
        base_name = base.embed if role == INPUT_ROWS_KEY or base.head is None else base.head
        indices = _token_indices(config, key)
        if len(indices) != delta.shape[0] or delta.dim() != 2:
            raise ExtractError(f"{where}: {key} has shape {list(delta.shape)} but token_indices has "
                               f"{len(indices)} ids")
        hidden = base.stored[base_name].entry["shape"][1]
        if delta.shape[1] != hidden:
            raise ExtractError(f"{where}: {key} has hidden size {delta.shape[1]} but the base's {base_name} has "
                               f"{hidden}: not an extension of this base")
        position = {token_id: i for i, token_id in enumerate(indices)}
        uncovered = [i for i in range(text, total) if i not in position]
        beyond = sorted(i for i in position if i >= total)
        if uncovered or beyond:
            raise ExtractError(
                f"{where}: token_indices must cover the new ids {text}..{total - 1} ({space.source}) and no more; "
                + (f"missing {uncovered[:5]}{' …' if len(uncovered) > 5 else ''} (those rows came from your resize "
                   "code, not the adapter)" if uncovered else f"ids beyond the vocabulary {beyond[:5]}")
            )
        text_ids = sorted(i for i in position if i < text)
        if text_ids:
            source_text = delta[[position[i] for i in text_ids]]
            base_text = torch.stack([base.rows(base_name)(i, i + 1)[0] for i in text_ids])
            if source_text.dtype != base_text.dtype:
                raise ExtractError(f"{where}: {key} is {source_text.dtype} but the base's {base_name} is "
                                   f"{base_text.dtype}")
            d, row = _max_drift(source_text, base_text)
            if d > max_drift:
                raise ExtractError(
                    f"{where}: {key} changes text token id {text_ids[row]} (largest difference {d:.6g}, tolerance "
                    f"--max-text-drift {max_drift:g}): not a vocabulary extension of this base")
            drift = max(drift, d)
        rows[role] = delta[[position[i] for i in range(text, total)]].clone()
    if base.head is None and OUTPUT_ROWS_KEY in rows:
        if not torch.equal(rows.pop(OUTPUT_ROWS_KEY), rows[INPUT_ROWS_KEY]):
            raise ExtractError(f"{where}: the base ties its lm_head to its embedding but the adapter's lm_head delta "
                               "differs from its embedding delta")
    notes = [_MEAN_HEAD_NOTE] if base.head is not None and OUTPUT_ROWS_KEY not in rows else []
    return rows, drift, notes


def _token_indices(config: Any, key: str) -> list[int]:
    """The ids a delta tensor holds: ``token_indices`` (TrainableTokensConfig) or ``trainable_token_indices``
    (LoraConfig: a list for the embedding, or a dict by module name)."""
    indices = getattr(config, "token_indices", None) or getattr(config, "trainable_token_indices", None)
    if isinstance(indices, dict):
        module = key.removeprefix(PEFT_KEY_PREFIX).split(".token_adapter")[0].removesuffix(f".{_DELTA}")
        found = [v for name, v in indices.items() if module == name or module.endswith(f".{name}")]
        indices = found[0] if found else None
    if not indices:
        raise ExtractError(f"{key}: the adapter config names no token indices for it")
    return [int(i) for i in indices]


def _companion_config(config: Any) -> LoraConfig:
    """The source's LoRA config as the rows' companion: the vocabulary modules are the rows' now."""
    lora = copy.deepcopy(config)
    lora.modules_to_save = None
    lora.trainable_token_indices = None
    lora.inference_mode = True
    return lora


# ---------------------------------------------------------------------- planning and writing
def plan_extract(
    base: PathLike,
    source: PathLike,
    *,
    token_space: Union[None, TokenSpace, dict, PathLike] = None,
    max_text_drift: float = 0.0,
    progress: Optional[bool] = None,
) -> ExtractPlan:
    """Resolve, read and check everything `extract_adapter` writes; nothing is written."""
    if not (max_text_drift >= 0 and math.isfinite(max_text_drift)):
        raise ExtractError(f"max_text_drift is {max_text_drift!r}; expected a finite number >= 0")
    try:
        base_info = _read_base(base)
        source_dir = resolve_dir(source, "source", [*_BASE_FILES, "*.bin"])
    except MergeError as exc:
        raise ExtractError(str(exc)) from None
    kind = source_kind(source_dir)
    space = resolve_source_token_space(token_space, source_dir, base_info.dir)
    try:
        if kind == CHECKPOINT:
            plan = _plan_checkpoint(base_info, source_dir, space, max_text_drift, progress)
        else:
            plan = _plan_peft(base_info, source_dir, kind, space, max_text_drift)
    except MergeError as exc:
        raise ExtractError(str(exc)) from None
    plan.base_ref, plan.source_ref = os.fspath(base), os.fspath(source)
    return plan


def extract_adapter(
    base: PathLike,
    source: PathLike,
    out: PathLike,
    *,
    token_space: Union[None, TokenSpace, dict, PathLike] = None,
    max_text_drift: float = 0.0,
    base_model: Optional[str] = None,
    overwrite: bool = False,
    progress: Optional[bool] = None,
) -> ExtractPlan:
    """Write the row-extension adapter that ``source`` amounts to on ``base`` into ``out``.

    Args:
        base: The base model SOURCE extends: a local directory or Hub id holding safetensors weights.
        source: A resized checkpoint (directory or Hub id, safetensors), a PEFT LoRA adapter with saved embedding
            layers, or a PEFT trainable-tokens adapter (see the module docstring).
        out: The adapter directory to create (config, rows, ``token_space.json``, model card, and ``lora/`` for a
            LoRA source), written atomically. An existing one is replaced only with ``overwrite`` and only when it
            is empty or an adapter; never the base or the source.
        token_space: The token space; default: ``token_space.json`` beside the source, else inferred from the
            source tokenizer's added tokens (`infer_token_space`).
        max_text_drift: The largest ``|source - base|`` accepted on the text rows (default 0: identical). The
            adapter always uses the base's text rows.
        base_model: The base id recorded in the adapter (default: BASE as given; a local path made absolute).

    Returns the plan that was written (``plan.text_drift``: the largest text-row drift found). Raises
    `ExtractError` (a ``ValueError``) naming the file, the tensor or field and both values; nothing is written then.
    """
    plan = plan_extract(base, source, token_space=token_space, max_text_drift=max_text_drift, progress=progress)
    target = os.path.abspath(os.fspath(out))
    head_rows = "trained" if OUTPUT_ROWS_KEY in plan.rows or plan.tied else "mean"
    config = RowExtensionConfig(
        token_space=plan.space, base_model_name_or_path=base_model or _base_id(plan.base_ref), head_rows=head_rows,
        lora_adapter=LORA_ADAPTER_NAME if plan.lora else None, inference_mode=True,
    )
    with atomic_output(target, overwrite=overwrite, marker=CONFIG_NAME, protected=(plan.base_dir, plan.source_dir),
                       error=ExtractError) as tmp:
        config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in plan.rows.items()}, os.path.join(tmp, WEIGHTS_NAME),
                  metadata={"format": "pt"})
        if plan.lora:
            write_lora(os.path.join(tmp, LORA_ADAPTER_NAME), *plan.lora)
        write_model_card(tmp, config, provenance=_provenance(plan), carry_over=False)
    return plan


def _base_id(base: str) -> str:
    """BASE as the adapter records it: a Hub id as given, a local directory as an absolute path."""
    return os.path.abspath(base) if os.path.isdir(base) or looks_like_path(base) else base


def _provenance(plan: ExtractPlan) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "extracted_with": f"uti-peft {_version('uti-peft')} extract",
        "source": plan.source_ref,
        "source_format": plan.kind,
        "text_vocab_size": plan.space.text_vocab_size,
        "vocab_size": plan.space.vocab_size,
    }
    if plan.text_drift:
        facts["source_text_drift"] = plan.text_drift
    return facts



# ---------------------------------------------------------------------- inspect
def describe_source(path: PathLike) -> dict[str, Any]:
    """What ``uti-peft inspect`` says about a directory `extract_adapter` reads, from headers and configs only."""
    path = os.fspath(path)
    kind = source_kind(path)
    space = resolve_token_space(None, path)
    facts: dict[str, Any] = {"format": kind, "path": path}
    if kind == CHECKPOINT:
        config = AutoConfig.from_pretrained(path)
        stored = read_checkpoint(path)
        embed, _, tied = _module_names(_meta_model(config))
        shape, dtype = stored[embed].entry["shape"], stored[embed].entry["dtype"]
        facts.update({"model_type": config.model_type, "vocab_rows": shape[0], "hidden_size": shape[1],
                      "dtype": str(_DTYPE_OF.get(dtype, dtype)).removeprefix("torch."), "tied": tied,
                      "tensors": len(stored)})
    else:
        config = PeftConfig.from_pretrained(path)
        header = _adapter_header(path)
        vocab = {k: f"{v['shape']} {v['dtype']}" for k, v in header.items() if ".lora_" not in k}
        facts.update({
            "peft_type": str(getattr(config.peft_type, "value", config.peft_type)),
            "base_model": config.base_model_name_or_path,
            "vocabulary_tensors": vocab or "none (nothing to extract: no saved embedding layers)",
            "lora_tensors": sum(".lora_" in k for k in header),
        })
        indices = getattr(config, "token_indices", None) or getattr(config, "trainable_token_indices", None)
        if indices:
            ids = sorted({i for v in (indices.values() if isinstance(indices, dict) else [indices]) for i in v})
            facts["token_indices"] = f"{len(ids)} ids, {ids[0]}..{ids[-1]}"
    facts["token_space"] = space.source if space else "none beside it (inferred from its tokenizer, or --token-space)"
    if space:
        facts["row_range"] = f"[{space.text_vocab_size}, {space.vocab_size})"
    facts["next"] = f"uti-peft extract BASE {path} -o ADAPTER"
    facts["problems"] = []
    return facts


def _adapter_header(path: str) -> dict[str, Any]:
    weights = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        return {}
    return {k: v for k, v in read_safetensors_header(weights).items() if k != "__metadata__"}
