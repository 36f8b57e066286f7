"""A base and an adapter loaded from safetensors files, as users load them: the extended head maps the base file's
text rows instead of copying them, the untied embedding's rows stay a mapping of the adapter file, and neither file
is ever written. Logits equal the legacy-patched and the merged model's, bit for bit, also for ``logits_to_keep=1``
(whose strided last-token slice meets a frozen head here, and a trainable one in those models)."""

from __future__ import annotations

import hashlib
import mmap
import os
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from transformers import AutoModelForCausalLM

from uti_peft.constants import INPUT_ROWS_KEY, WEIGHTS_NAME
from uti_peft.memory import _file_mapping_of
from uti_peft.row_extension._compat import _page_aligned_rows
from uti_peft.tiny import build_tiny_qwen3

from conftest import legacy_model_for, probe_ids, train_steps

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="file mappings are read from /proc/self (Linux)")
DTYPES = [torch.float32, torch.bfloat16]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def saved(tmp_path, make_adapter):
    """(base dir, adapter dir) for a base of the given kind: the adapter was trained on that very base."""

    def make(tied: bool, dtype: torch.dtype):
        base = tmp_path / "base"
        build_tiny_qwen3(tied=tied, dtype=dtype).save_pretrained(base)
        return base, make_adapter(tied=tied, dtype=dtype)

    return make


def load(base_dir, adapter_dir, dtype, **kwargs) -> PeftModel:
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), adapter_dir, **kwargs)


def embedding_rows(model: PeftModel) -> torch.Tensor:
    return model.get_input_embeddings().row_extension_input_rows["default"]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_loaded_files_are_mapped_not_copied_and_logits_are_exact(saved, token_space, tmp_path, tied, dtype):
    base_dir, adapter_dir = saved(tied, dtype)
    model = load(base_dir, adapter_dir, dtype)
    text = token_space.text_vocab_size

    head = model.get_output_embeddings().weight
    # (the last text rows share a page with the first new rows, which writing those gave a private copy)
    assert _file_mapping_of(head[: text // 2]).path == str(base_dir / "model.safetensors")
    if not tied:  # kept apart from the base weight: still the adapter file's bytes (PEFT's second read was skipped)
        assert _file_mapping_of(embedding_rows(model)).path == str(adapter_dir / WEIGHTS_NAME)
    layer = model.get_output_embeddings()
    replaced = (layer.tied_to or layer).row_extension_replaced["default"]  # the base's padding rows, for unload
    assert _file_mapping_of(replaced).path == str(base_dir / "model.safetensors")
    on_disk = load_file(base_dir / "model.safetensors")
    base_head = on_disk["model.embed_tokens.weight" if tied else "lm_head.weight"]
    assert torch.equal(load(base_dir, adapter_dir, dtype).unload().get_output_embeddings().weight, base_head)

    ids = probe_ids(token_space)
    legacy = legacy_model_for(adapter_dir, token_space, tied=tied, dtype=dtype)
    model.merge_and_unload().save_pretrained(tmp_path / "merged")  # the rows are merged in place: same logits
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype)
    model = load(base_dir, adapter_dir, dtype)
    with torch.no_grad():
        for kwargs in ({}, {"logits_to_keep": 1}):
            ours = model(input_ids=ids, **kwargs).logits
            assert ours.dtype == dtype and ours.shape[-1] == token_space.vocab_size
            assert torch.equal(ours, legacy(input_ids=ids, **kwargs).logits)
            assert torch.equal(ours, merged(input_ids=ids, **kwargs).logits)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_training_a_loaded_adapter_never_writes_its_files(saved, token_space, tmp_path, tied):
    base_dir, adapter_dir = saved(tied, torch.float32)
    files = [base_dir / "model.safetensors", adapter_dir / WEIGHTS_NAME]
    before = [sha256(path) for path in files]
    model = load(base_dir, adapter_dir, torch.float32, is_trainable=True)
    train_steps(model, token_space)

    assert [sha256(path) for path in files] == before
    trained = embedding_rows(model).detach().clone()
    assert not torch.equal(trained, load_file(files[1])[INPUT_ROWS_KEY])
    assert _file_mapping_of(model.get_output_embeddings().weight[: token_space.text_vocab_size // 2]) is not None
    model.save_pretrained(tmp_path / "trained")
    assert torch.equal(load_file(tmp_path / "trained" / WEIGHTS_NAME)[INPUT_ROWS_KEY], trained)


def test_loading_the_file_again_restores_rows_changed_in_memory(saved):
    base_dir, adapter_dir = saved(False, torch.float32)
    model = load(base_dir, adapter_dir, torch.float32)
    on_disk = load_file(adapter_dir / WEIGHTS_NAME)
    with torch.no_grad():
        embedding_rows(model).mul_(2)  # written: no longer the file's bytes, so the reload must copy
    set_peft_model_state_dict(model, load_file(adapter_dir / WEIGHTS_NAME))
    assert torch.equal(embedding_rows(model), on_disk[INPUT_ROWS_KEY])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_trainable_head_takes_the_merged_models_product(saved, token_space, tmp_path, tied):
    """With gradients on (the rows' own backward), ``logits_to_keep=1`` still gives the merged model's logits."""
    base_dir, adapter_dir = saved(tied, torch.bfloat16)
    model = load(base_dir, adapter_dir, torch.bfloat16, is_trainable=True)
    load(base_dir, adapter_dir, torch.bfloat16).merge_and_unload().save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16)  # weights require grad
    ids = probe_ids(token_space)
    ours = model(input_ids=ids, logits_to_keep=1).logits
    assert ours.requires_grad
    with torch.no_grad():
        assert torch.equal(ours.detach(), merged(input_ids=ids, logits_to_keep=1).logits)
    ours.float().sum().backward()
    assert embedding_rows(model).grad is not None


def test_frozen_head_runs_one_mm_for_the_last_token(saved, token_space):
    """``logits_to_keep=1`` slices the hidden states with strides ``torch.matmul`` cannot fold for a frozen weight; the
    head folds them itself, so the forward runs the merged model's ``mm``, never the batched product (which copies
    the whole head on CPUs)."""
    model = load(*saved(False, torch.bfloat16), torch.bfloat16)
    with torch.no_grad(), torch.profiler.profile() as profile:
        model(input_ids=probe_ids(token_space), logits_to_keep=1)
    products = {event.key for event in profile.key_averages() if event.key in ("aten::mm", "aten::bmm")}
    assert products == {"aten::mm"}


def new_rows_in_memory(model: PeftModel, space) -> torch.Tensor:
    """The new rows the extended matrix holds in place: the head's, on a tied base the one shared matrix's."""
    with torch.no_grad():
        return model.get_output_embeddings().weight[space.text_vocab_size :]


def first_own_page_row(rows: torch.Tensor) -> int:
    """The first row that does not share a page with the text rows before it."""
    return -(-((-rows.data_ptr()) % mmap.PAGESIZE) // (rows.shape[1] * rows.element_size()))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_an_adapter_saved_from_its_loaded_base_is_mapped_when_loaded_again(saved, token_space, tmp_path, tied):
    """PEFT's save_pretrained of a model whose head maps the base file lays the rows file out so that its head rows
    sit at the base head's offset within a page: loading it onto that base then maps them (nothing written but the
    page shared with the text rows) and PEFT's second load of the same bytes is skipped; the logits stay exact and
    training writes private copies, never the file."""
    base_dir, adapter_dir = saved(tied, torch.bfloat16)
    load(base_dir, adapter_dir, torch.bfloat16).save_pretrained(tmp_path / "saved")
    rows_file = tmp_path / "saved" / WEIGHTS_NAME
    before = sha256(rows_file)

    model = load(base_dir, tmp_path / "saved", torch.bfloat16)
    rows = new_rows_in_memory(model, token_space)
    assert _file_mapping_of(rows[first_own_page_row(rows) :]).path == str(rows_file)
    unaligned = load(base_dir, adapter_dir, torch.bfloat16)  # saved from a base built in memory: (mostly) copied
    ids = probe_ids(token_space)
    legacy = legacy_model_for(adapter_dir, token_space, tied=tied, dtype=torch.bfloat16)
    with torch.no_grad():
        for kwargs in ({}, {"logits_to_keep": 1}):
            assert torch.equal(model(input_ids=ids, **kwargs).logits, legacy(input_ids=ids, **kwargs).logits)
            assert torch.equal(model(input_ids=ids, **kwargs).logits, unaligned(input_ids=ids, **kwargs).logits)

    trained = load(base_dir, tmp_path / "saved", torch.bfloat16, is_trainable=True)
    train_steps(trained, token_space)
    assert not torch.equal(new_rows_in_memory(trained, token_space), new_rows_in_memory(model, token_space))
    assert sha256(rows_file) == before


def in_place_save_file(tensors, filename, metadata=None):
    """How safetensors before 0.5 wrote a file (0.4.5 checked): truncated and rewritten in place, same inode."""
    data = safetensors_bytes(tensors, metadata=metadata)
    with open(filename, "r+b" if os.path.exists(filename) else "wb") as f:
        f.truncate(0)
        f.write(data)


def test_a_rows_file_is_replaced_not_rewritten_under_a_model_that_maps_it(saved, token_space, tmp_path):
    """A file rewritten in place under a private mapping shows the new bytes in every page not yet copied: a model
    that loaded the rows would change. uti-peft's writer of rows files (what PEFT's save_pretrained calls for our
    adapter) writes a new file and renames it over the old, whatever safetensors version does the writing."""
    base_dir, adapter_dir = saved(False, torch.bfloat16)
    load(base_dir, adapter_dir, torch.bfloat16).save_pretrained(tmp_path / "saved")
    rows_file = tmp_path / "saved" / WEIGHTS_NAME
    ids = probe_ids(token_space)
    other = load(base_dir, tmp_path / "saved", torch.bfloat16, is_trainable=True)
    train_steps(other, token_space)
    trained = {k: v.detach().clone() for k, v in get_peft_model_state_dict(other).items()}

    loaded = load(base_dir, tmp_path / "saved", torch.bfloat16)
    with torch.no_grad():
        expected = loaded(input_ids=ids).logits
    _page_aligned_rows(in_place_save_file)(trained, str(rows_file), metadata={"format": "pt"})
    assert all(torch.equal(v, trained[k]) for k, v in load_file(rows_file).items())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    assert sorted(p.name for p in rows_file.parent.iterdir()) == sorted(p.name for p in adapter_dir.iterdir())

    # the hazard itself: the same writer without ours changes the model that maps the file
    victim = load(base_dir, tmp_path / "saved", torch.bfloat16)
    with torch.no_grad():
        before = victim(input_ids=ids).logits
    in_place_save_file(load_file(adapter_dir / WEIGHTS_NAME), str(rows_file))
    with torch.no_grad():
        assert not torch.equal(victim(input_ids=ids).logits, before)
