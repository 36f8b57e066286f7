"""``uti-peft merge``: a row-extension adapter (and its LoRA) merged into a standalone checkpoint, streamed.

Engines such as vLLM and SGLang load plain transformers checkpoints, not our adapters (and no longer take new
token rows beside a LoRA). `merge_adapter` writes one: ``config.json`` (``vocab_size`` = the token space's
total, ``pad_token_id``), ``generation_config.json``, safetensors shards (with an index when there are several,
as transformers writes them), the base tokenizer extended with every modality token, ``token_space.json``, a
model card (``base_model_relation: merge``) and a marker file naming what it was made from.

Nothing is instantiated: the base's shards are read tensor by tensor and written to the output shards. Only the
input embedding and the lm_head change (``concat(base[:text_vocab_size], rows)``, exactly what the tuner,
`uti_peft.row_extension.model.RowExtensionModel`, builds) and, with a LoRA companion, each LoRA-targeted weight,
merged by the layer PEFT itself creates (``peft.inject_adapter_in_model`` on a one-module holder, then its
``merge()``), so the result equals ``PeftModel.from_pretrained(base, adapter).merge_and_unload()`` bit for bit.
Module names come from the model built on the ``meta`` device (``get_input_embeddings()`` /
``get_output_embeddings()``), which costs no memory. Tensors that do not change are copied byte for byte
(``copy_file_range``); peak memory is that of the largest tensor being converted or merged, not of the model.
Everything is checked before the first byte is written, and the output appears atomically
(`uti_peft.output.atomic_output`).
"""

from __future__ import annotations

import inspect
import json
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.serialization import split_torch_state_dict_into_shards
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from transformers.utils import logging as hf_logging

from .card import package_version, render_merged_card
from .constants import CARD_NAME, INPUT_ROWS_KEY, OUTPUT_ROWS_KEY, TOKEN_SPACE_NAME, WEIGHTS_NAME
from .errors import MergeError, RowExtensionError
from .files import SAFETENSORS_CODES, SAFETENSORS_DTYPES, dtype_from_name, file_sha256, read_safetensors_header
from .adapter_location import explain_hub_error
from .adapter_folder import AdapterFolder, check_adapter_folder
from .output import atomic_output, check_target, copy_range, write_all
from .paths import looks_like_path, portable_base
from .row_extension.layer import mean_rows
from .row_extension.lora import SavedLora, merge_lora_weight, read_saved_lora
from .tokenizer import TOKENIZER_FILES, has_tokenizer_files, load_extended_tokenizer

MARKER_NAME = "uti_peft_merge.json"
# what a base checkpoint (and its tokenizer) is made of, on the Hub
BASE_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
PathLike = Union[str, os.PathLike]


def default_max_shard_size() -> Union[int, str]:
    """transformers' own default (``save_pretrained(max_shard_size=...)``, "50GB" in transformers 5)."""
    return inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default


@dataclass
class StoredTensor:
    """One tensor of the base checkpoint: its shard, header entry and where its bytes start in the file."""

    shard: str
    entry: dict[str, Any]
    data_start: int

    @property
    def offset(self) -> int:
        return self.data_start + self.entry["data_offsets"][0]

    @property
    def nbytes(self) -> int:
        return self.entry["data_offsets"][1] - self.entry["data_offsets"][0]


@dataclass
class MergePlan:
    """Everything `merge_adapter` writes, decided and checked before the first byte is."""

    base_ref: str
    adapter_ref: str
    base_dir: str
    adapter: AdapterFolder
    config: Any  # the merged model's transformers config
    generation_config: GenerationConfig
    tokenizer: Optional[Any]  # extended with the modality tokens
    stored: dict[str, StoredTensor]  # the base's tensors
    outputs: dict[str, tuple[torch.dtype, list[int]]]  # name -> (dtype, shape), in writing order
    embed: str
    head: Optional[str]  # None when tied (or headless)
    tied: bool
    rows: dict[str, torch.Tensor]  # the adapter's row blocks
    lora: Optional[SavedLora]
    max_shard_size: Union[int, str]


# ---------------------------------------------------------------------- resolving and reading the inputs
def resolve_dir(name_or_path: PathLike, what: str, allow_patterns: Optional[list[str]] = None) -> str:
    """A local directory as is (never sent to the Hub), else a Hub repo through the cache (``snapshot_download``,
    offline-capable with ``HF_HUB_OFFLINE=1``)."""
    name = os.path.expanduser(os.fspath(name_or_path))
    if os.path.exists(name):
        if not os.path.isdir(name):
            raise MergeError(f"{what} {name!r} is not a directory")
        return name
    if looks_like_path(name):
        raise MergeError(f"{what} directory {name!r} does not exist")
    try:
        return snapshot_download(name, allow_patterns=allow_patterns)
    except Exception as exc:
        raise MergeError(f"{what} {name!r}: {explain_hub_error(exc, name)}") from exc


def read_checkpoint(base_dir: str) -> dict[str, StoredTensor]:
    """The base's tensors (``model.safetensors`` or the shards of ``model.safetensors.index.json``), every shard's
    header checked against its size (a truncated shard is refused), without reading any tensor data."""
    index = os.path.join(base_dir, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MergeError(f"{index}: field weight_map is {weight_map!r}, expected a non-empty object")
    elif os.path.isfile(os.path.join(base_dir, SAFE_WEIGHTS_NAME)):
        index, weight_map = None, None
    else:
        raise MergeError(
            f"base {base_dir!r} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME} (files: "
            f"{sorted(os.listdir(base_dir))}); only safetensors checkpoints can be merged"
        )
    stored: dict[str, StoredTensor] = {}
    for shard in dict.fromkeys(weight_map.values()) if weight_map else [SAFE_WEIGHTS_NAME]:
        path = os.path.join(base_dir, shard)
        if not os.path.isfile(path):
            raise MergeError(f"{index}: weight_map names shard {shard!r}, which is missing from {base_dir}")
        try:
            header = read_safetensors_header(path)
        except (ValueError, OSError) as exc:  # truncated or not safetensors: RowExtensionError, JSON errors
            raise MergeError(f"base shard {exc}") from exc
        with open(path, "rb") as f:
            data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        for name, entry in header.items():
            if name != "__metadata__" and (weight_map is None or weight_map.get(name) == shard):
                stored[name] = StoredTensor(path, entry, data_start)
    missing = sorted(set(weight_map or ()) - set(stored))
    if missing:
        raise MergeError(f"{index}: weight_map lists {missing[:5]} but their shards do not hold them")
    return stored


def read_base_checkpoint(base_dir: str) -> tuple[Any, dict[str, StoredTensor], nn.Module]:
    """A base directory's transformers config, its tensors (`read_checkpoint`) and its architecture on the meta
    device (`meta_model`): what merge and extract both need of a base, without loading a weight."""
    if not os.path.isfile(os.path.join(base_dir, "config.json")):
        raise MergeError(f"base {base_dir!r} has no config.json (files: {sorted(os.listdir(base_dir))})")
    config = AutoConfig.from_pretrained(base_dir)
    return config, read_checkpoint(base_dir), meta_model(config)


def meta_model(config: Any) -> nn.Module:
    """The base architecture on the ``meta`` device: names and shapes, no memory."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # transformers 5.0 does not tie a model built on the meta device; later versions do
    return model


def module_names(model: nn.Module) -> tuple[str, Optional[str], bool]:
    """Checkpoint names of the input embedding and lm_head weights (None: no head), and whether they are tied."""
    names = {id(m): n for n, m in model.named_modules()}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and out.weight is inp.weight
    return f"{names[id(inp)]}.weight", None if out is None else f"{names[id(out)]}.weight", tied


# ---------------------------------------------------------------------- planning: every check, nothing written
def plan_merge(
    base: PathLike,
    adapter: PathLike,
    *,
    dtype: Union[None, str, torch.dtype] = None,
    tokenizer: Optional[PathLike] = None,
    max_shard_size: Union[None, int, str] = None,
) -> MergePlan:
    """Resolve and check the inputs; see `merge_adapter`."""
    base_dir = resolve_dir(base, "base", BASE_FILES)
    folder = check_adapter_folder(resolve_dir(adapter, "adapter", ["*.json", "*.safetensors", "*.md"]))
    space = folder.config.get_token_space()
    config, stored, model = read_base_checkpoint(base_dir)
    embed, head, tied = module_names(model)
    _check_shapes(base_dir, folder, stored, embed, None if tied else head, config)
    out_dtype = _parse_dtype(dtype) or SAFETENSORS_DTYPES.get(stored[embed].entry["dtype"])
    if out_dtype is None:
        raise MergeError(f"{stored[embed].shard}: {embed} has dtype {stored[embed].entry['dtype']!r}, expected one of "
                         f"{sorted(SAFETENSORS_DTYPES)}")
    if tied:
        stored.pop(head, None)  # a tied head stored anyway: transformers drops it on save, the embedding is the matrix
        head = None
    outputs = {}
    for name, item in stored.items():
        shape = [space.vocab_size, item.entry["shape"][1]] if name in (embed, head) else item.entry["shape"]
        own = SAFETENSORS_DTYPES.get(item.entry["dtype"])
        outputs[name] = (own if own is None or (dtype is None and name not in (embed, head)) else out_dtype, shape)
    text_config = config.get_text_config()
    text_config.vocab_size, config.pad_token_id, config.dtype = space.vocab_size, space.pad_token_id, out_dtype
    generation_config = (
        GenerationConfig.from_pretrained(base_dir)
        if os.path.isfile(os.path.join(base_dir, "generation_config.json"))
        else GenerationConfig.from_model_config(config)
    )
    generation_config.pad_token_id = space.pad_token_id
    rows = _load_rows(folder, tied)
    lora = None
    if folder.config.lora_adapter:
        shapes = {name: item.entry["shape"] for name, item in stored.items()}
        where = os.path.join(folder.path, folder.config.lora_adapter)
        lora = read_saved_lora(where, folder.config.lora_adapter, model, shapes)
    plan = MergePlan(
        portable_base(os.fspath(base)), portable_base(os.fspath(adapter)), base_dir, folder, config, generation_config,
        _extended_tokenizer(base_dir, tokenizer, space), stored, outputs, embed, head, tied, rows, lora,
        max_shard_size if max_shard_size is not None else default_max_shard_size(),
    )
    _shards(plan)  # an invalid max_shard_size fails here, before anything is written
    return plan


def _check_shapes(base_dir: str, folder: AdapterFolder, stored: dict[str, StoredTensor], embed: str,
                  head: Optional[str], config: Any) -> None:
    """The adapter's rows against the base's embedding (and head), naming the files and both values."""
    config_file = os.path.join(base_dir, "config.json")
    adapter_file = os.path.join(folder.path, WEIGHTS_NAME)
    text_vocab_size = folder.config.text_vocab_size
    for name in filter(None, (embed, head)):
        if name not in stored:
            raise MergeError(f"base {base_dir!r}: the checkpoint holds no {name!r} (the model's "
                             f"{'input embedding' if name == embed else 'lm_head'} weight)")
        shape = stored[name].entry["shape"]
        where = os.path.relpath(stored[name].shard, base_dir)
        if len(shape) != 2 or shape[1] != folder.hidden_size:
            raise MergeError(f"{adapter_file}: rows have hidden size {folder.hidden_size} but {where}: {name} has "
                             f"shape {shape} (hidden size {shape[-1]})")
        if shape[0] < text_vocab_size:
            raise MergeError(f"{where}: {name} has {shape[0]} rows, fewer than the token space's text_vocab_size "
                             f"{text_vocab_size} ({os.path.join(folder.path, TOKEN_SPACE_NAME)})")
    vocab_size = config.get_text_config().vocab_size
    if vocab_size != stored[embed].entry["shape"][0]:
        raise MergeError(f"{config_file}: field vocab_size is {vocab_size} but {embed} has "
                         f"{stored[embed].entry['shape'][0]} rows")


def _parse_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    try:
        return None if dtype is None else dtype_from_name(dtype)
    except RowExtensionError as exc:
        raise MergeError(str(exc)) from None


def _load_rows(folder: AdapterFolder, tied: bool) -> dict[str, torch.Tensor]:
    """The adapter's rows per role, chosen as the tuner chooses them: on a tied base the head block wins (see
    `RowExtensionModel._remap_adapter_state_dict_for_load`); an untied base needs the input block."""
    rows = load_file(os.path.join(folder.path, WEIGHTS_NAME))
    if tied:
        return {INPUT_ROWS_KEY: rows.get(OUTPUT_ROWS_KEY, rows.get(INPUT_ROWS_KEY))}
    if INPUT_ROWS_KEY not in rows:
        raise MergeError(f"{os.path.join(folder.path, WEIGHTS_NAME)} holds lm_head rows only, but the base's input "
                         "embedding is not tied to its lm_head: its new input rows would be undefined")
    return rows


def _extended_tokenizer(base_dir: str, tokenizer: Optional[PathLike], space: Any) -> Optional[Any]:
    """The given tokenizer, else the base's own (when it has tokenizer files), with every modality token added."""
    if tokenizer is None:
        if not has_tokenizer_files(base_dir):
            warnings.warn(f"base {base_dir!r} has no tokenizer files and no tokenizer was given: the merged "
                          "checkpoint has none (pass --tokenizer for engines that need one)")
            return None
        where = base_dir
    else:
        where = resolve_dir(tokenizer, "tokenizer", [*TOKENIZER_FILES, "*.json", "*.txt", "*.model", "*.jinja"])
    try:
        return load_extended_tokenizer(where, space)
    except ValueError as exc:
        raise MergeError(str(exc)) from exc


# ---------------------------------------------------------------------- writing
def _shards(plan: MergePlan):
    """transformers' own shard layout and names (``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
    with an index), computed from sizes alone."""
    sized = {name: torch.empty(_nbytes(plan, name), dtype=torch.uint8, device="meta") for name in plan.outputs}
    try:
        return split_torch_state_dict_into_shards(
            sized, filename_pattern=SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
            max_shard_size=plan.max_shard_size,
        )
    except (ValueError, TypeError) as exc:
        raise MergeError(f"max_shard_size is {plan.max_shard_size!r}: {exc}") from exc


def _nbytes(plan: MergePlan, name: str) -> int:
    dtype, shape = plan.outputs[name]
    if dtype is None:
        return plan.stored[name].nbytes
    return torch.Size(shape).numel() * dtype.itemsize


def _write_shard(plan: MergePlan, path: str, names: list[str], bar) -> None:
    """One safetensors file, written tensor by tensor behind a header computed up front."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    position = 0
    for name in names:
        dtype, shape = plan.outputs[name]
        code = plan.stored[name].entry["dtype"] if dtype is None else SAFETENSORS_CODES[dtype]
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [position, position + _nbytes(plan, name)]}
        position += _nbytes(plan, name)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb", buffering=0) as f:
        write_all(f, struct.pack("<Q", len(raw)) + raw)
        for name in names:
            written = _write_tensor(plan, name, f)
            if written != _nbytes(plan, name):
                raise MergeError(f"{path}: wrote {written} bytes of {name}, expected {_nbytes(plan, name)}")
            bar.update(written)


def _write_tensor(plan: MergePlan, name: str, f) -> int:
    dtype, _ = plan.outputs[name]
    item = plan.stored[name]
    if name in (plan.embed, plan.head):
        return _write_extended(plan, name, f)
    path = name.removesuffix(".weight")
    if plan.lora is not None and name.endswith(".weight") and path in plan.lora.weights:
        return write_all(f, merge_lora_weight(plan.lora, path, _load(item, name, dtype)))
    if dtype is None or dtype == SAFETENSORS_DTYPES[item.entry["dtype"]]:
        return copy_range(item.shard, item.offset, f, item.nbytes)
    return write_all(f, _load(item, name, dtype))


def _write_extended(plan: MergePlan, name: str, f) -> int:
    """``concat(base[:text_vocab_size], rows)`` in the output dtype, as `RowExtensionLayer` builds it: the text
    rows copied (or converted in chunks), then the new rows (the mean of the head's text rows when the adapter has
    none for an untied head, as the tuner computes it, `uti_peft.row_extension.layer.mean_rows`)."""
    dtype, _ = plan.outputs[name]
    item, config = plan.stored[name], plan.adapter.config
    text = config.text_vocab_size
    hidden = item.entry["shape"][1]
    if name == plan.embed:
        rows = plan.rows[INPUT_ROWS_KEY]
    elif OUTPUT_ROWS_KEY in plan.rows:
        rows = plan.rows[OUTPUT_ROWS_KEY]
    else:
        with safe_open(item.shard, framework="pt") as st:
            rows = mean_rows(st.get_slice(name)[:text].to(dtype), text, config.num_new_rows)
    if dtype == SAFETENSORS_DTYPES.get(item.entry["dtype"]):
        written = copy_range(item.shard, item.offset, f, text * hidden * dtype.itemsize)
    else:
        written = 0
        step = max(1, (16 << 20) // (hidden * dtype.itemsize))  # 16 MiB of rows at a time
        with safe_open(item.shard, framework="pt") as st:
            text_rows = st.get_slice(name)
            for start in range(0, text, step):
                written += write_all(f, text_rows[start : min(start + step, text)].to(dtype))
    return written + write_all(f, rows.to(dtype))


def _load(item: StoredTensor, name: str, dtype: Optional[torch.dtype]) -> torch.Tensor:
    with safe_open(item.shard, framework="pt") as st:
        tensor = st.get_tensor(name)
    return tensor if dtype is None else tensor.to(dtype)


def merge_adapter(
    base: PathLike,
    adapter: PathLike,
    out: PathLike,
    *,
    dtype: Union[None, str, torch.dtype] = None,
    tokenizer: Optional[PathLike] = None,
    max_shard_size: Union[None, int, str] = None,
    overwrite: bool = False,
    progress: Optional[bool] = None,
) -> str:
    """Write ``base`` with ``adapter`` (and its LoRA) merged into ``out``, a standalone transformers checkpoint.

    Args:
        base, adapter: Local directories or Hub ids (resolved through the Hub cache; a local path is never sent
            to the Hub). ``base`` must hold safetensors weights.
        out: The output directory, written atomically. An existing one is replaced only with ``overwrite`` and
            only when it is empty or an earlier merge output (it holds ``uti_peft_merge.json``); never the base
            or the adapter.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for every floating tensor (default: keep each
            tensor's own; the extended matrices take the embedding's).
        tokenizer: Directory or Hub id of the text tokenizer (default: the base's own tokenizer files, if any);
            it must have ``text_vocab_size`` tokens. Every modality token is added to it.
        max_shard_size: As ``save_pretrained``'s (default: transformers' own, `default_max_shard_size`).
        progress: Show a progress bar (None: transformers' setting).

    Returns the absolute path of ``out``. Raises `MergeError` (nothing written) on bad input.
    """
    target = os.path.abspath(os.fspath(out))
    # warnings (a base without a tokenizer) are shown once every check has passed: an error comes alone
    with warnings.catch_warnings(record=True) as notes:
        plan = plan_merge(base, adapter, dtype=dtype, tokenizer=tokenizer, max_shard_size=max_shard_size)
        protected = (plan.base_dir, plan.adapter.path)
        check_target(target, overwrite, MARKER_NAME, protected, MergeError)
    for note in notes:
        warnings.showwarning(note.message, note.category, note.filename, note.lineno)
    with atomic_output(target, overwrite=overwrite, marker=MARKER_NAME, protected=protected, error=MergeError) as tmp:
        _write_checkpoint(plan, tmp, progress)
        facts = _provenance(plan)
        card = render_merged_card(
            plan.adapter.config, facts, base_ref=plan.base_ref, adapter_ref=plan.adapter_ref, tied=plan.tied,
            head_rows_stored=OUTPUT_ROWS_KEY in plan.rows, weights_bytes=sum(_nbytes(plan, n) for n in plan.outputs),
        )
        card.save(os.path.join(tmp, CARD_NAME))
        with open(os.path.join(tmp, MARKER_NAME), "w", encoding="utf-8") as f:
            json.dump(facts, f, indent=2, sort_keys=True)
            f.write("\n")
    return target


def _write_checkpoint(plan: MergePlan, tmp: str, progress: Optional[bool]) -> None:
    plan.config.save_pretrained(tmp)
    plan.generation_config.save_pretrained(tmp)
    if plan.tokenizer is not None:
        plan.tokenizer.save_pretrained(tmp)
    plan.adapter.config.get_token_space().save(os.path.join(tmp, TOKEN_SPACE_NAME))
    split = _shards(plan)
    total = sum(_nbytes(plan, name) for name in plan.outputs)
    disable = not hf_logging.is_progress_bar_enabled() if progress is None else not progress
    with hf_logging.tqdm(total=total, desc="Writing merged shards", unit="B", unit_scale=True, disable=disable) as bar:
        for shard, names in split.filename_to_tensors.items():
            _write_shard(plan, os.path.join(tmp, shard), names, bar)
    if split.is_sharded:
        parameters = sum(torch.Size(plan.outputs[n][1]).numel() for n in plan.outputs)
        index = {"metadata": {"total_parameters": parameters, **split.metadata}, "weight_map": split.tensor_to_filename}
        with open(os.path.join(tmp, SAFE_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _provenance(plan: MergePlan) -> dict[str, Any]:
    """What the merge was made from (the marker file's content and the card's ``uti_peft`` block)."""
    config = plan.adapter.config
    lora_file = os.path.join(plan.lora.where, SAFETENSORS_WEIGHTS_NAME) if plan.lora else None
    return {
        "uti_peft_version": package_version("uti-peft"),
        "base": plan.base_ref,
        "adapter": plan.adapter_ref,
        "adapter_sha256": file_sha256(os.path.join(plan.adapter.path, WEIGHTS_NAME)),
        "lora_adapter": plan.lora.name if plan.lora else None,
        "lora_sha256": file_sha256(lora_file) if lora_file else None,
        "token_space_sha256": config.token_space_sha256,
        "text_vocab_size": config.text_vocab_size,
        "vocab_size": config.vocab_size,
        "pad_token_id": config.pad_token_id,
        "dtype": str(plan.config.dtype).removeprefix("torch."),
    }
