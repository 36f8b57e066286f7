"""transformers' own adapter entry points load a row-extension adapter exactly (or refuse clearly).

Every door is compared with the legacy recipe written with transformers alone (`conftest.legacy_patch`:
``resize_token_embeddings`` twice, copy the rows in; the LoRA, if any, loaded by plain PEFT onto that
patched model), on the variants that matter: tied/untied, fp32/bf16, and bases with more rows than the
text vocabulary (Qwen3's 151,936), exactly the text vocabulary, and already ``vocab_size`` rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

import pytest
import torch
from huggingface_hub import constants
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, pipeline

import uti_peft
from uti_peft.constants import INPUT_ROWS_KEY, OUTPUT_ROWS_KEY, WEIGHTS_NAME
from uti_peft.tiny import build_tiny_qwen3

from conftest import BASE_ROWS, TEXT_VOCAB, legacy_patch, probe_ids, saved_rows, train_steps
from hub_cache import commit_to_cache, folder_files
from test_tokenizer import word_tokenizer

VOCAB = 1576  # tiny_token_space().vocab_size
ROW_COUNTS = {"qwen-like": BASE_ROWS, "text-size": TEXT_VOCAB, "extended": VOCAB}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def make_adapter(root, space, *, tied=False, dtype=torch.float32, vocab_rows=BASE_ROWS, lora=False, seed=0):
    """A saved base (with a tokenizer) and a trained adapter that records it; returns both paths."""
    base_dir, adapter_dir = root / "base", root / "adapter"
    base = build_tiny_qwen3(tied=tied, dtype=dtype, vocab_rows=vocab_rows)
    base.save_pretrained(base_dir)
    word_tokenizer(TEXT_VOCAB).save_pretrained(base_dir)
    model = get_peft_model(base, uti_peft.RowExtensionConfig(token_space=space))
    if lora:
        uti_peft.add_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=PROJECTIONS))
    train_steps(model, space, seed=seed)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def legacy_reference(adapter_dir, space, **base_kwargs):
    """The legacy recipe on a fresh base: transformers' resizes, rows copied in, LoRA by plain PEFT."""
    rows = saved_rows(adapter_dir)
    model = legacy_patch(build_tiny_qwen3(**base_kwargs), space, rows[INPUT_ROWS_KEY], rows.get(OUTPUT_ROWS_KEY))
    if os.path.isdir(adapter_dir / "lora"):
        model = PeftModel.from_pretrained(model, adapter_dir / "lora")
    return model


def assert_exact(model, reference, space, dtype):
    ids = probe_ids(space)
    ours = logits(model, ids)
    assert ours.dtype == dtype and ours.shape[-1] == space.vocab_size
    assert torch.equal(ours, logits(reference, ids))


VARIANTS = [
    pytest.param(tied, dtype, rows, id=f"{'tied' if tied else 'untied'}-{str(dtype)[6:]}-{name}")
    for tied in (False, True)
    for dtype in (torch.float32, torch.bfloat16)
    for name, rows in ROW_COUNTS.items()
]


@pytest.mark.parametrize("tied,dtype,vocab_rows", VARIANTS)
def test_every_transformers_door_is_exact(tmp_path, token_space, tied, dtype, vocab_rows):
    kw = dict(tied=tied, dtype=dtype, vocab_rows=vocab_rows)
    base_dir, adapter_dir = make_adapter(tmp_path, token_space, **kw)
    reference = legacy_reference(adapter_dir, token_space, **kw)

    by_adapter = AutoModelForCausalLM.from_pretrained(adapter_dir)
    assert_exact(by_adapter, reference, token_space, dtype)
    assert by_adapter.config.vocab_size == token_space.vocab_size
    assert by_adapter.config.pad_token_id == token_space.pad_token_id

    for name in ("default", "rows"):
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        base.load_adapter(adapter_dir, adapter_name=name)
        assert_exact(base, reference, token_space, dtype)
        assert base.active_adapters() == [name]
        assert not any(p.requires_grad for p in base.parameters())  # loaded for inference, as transformers does

    # round trips: save_pretrained of a model loaded that way, and its adapter state dict
    by_adapter.save_pretrained(tmp_path / "again")
    assert sorted(os.listdir(tmp_path / "again")) == sorted(os.listdir(adapter_dir))
    again = load_file(tmp_path / "again" / WEIGHTS_NAME)
    assert again.keys() == saved_rows(adapter_dir).keys()
    assert all(torch.equal(again[k], v) for k, v in saved_rows(adapter_dir).items())
    assert_exact(AutoModelForCausalLM.from_pretrained(tmp_path / "again"), reference, token_space, dtype)

    # as Trainer saves a transformers model: with the model's state dict passed in
    by_adapter.save_pretrained(tmp_path / "trainer", state_dict=by_adapter.state_dict(), safe_serialization=True)
    assert_exact(AutoModelForCausalLM.from_pretrained(tmp_path / "trainer"), reference, token_space, dtype)

    state = by_adapter.get_adapter_state_dict()
    assert state.keys() == saved_rows(adapter_dir).keys()
    fresh = AutoModelForCausalLM.from_pretrained(base_dir)
    fresh.load_adapter(peft_config=by_adapter.peft_config["default"], adapter_state_dict=state)
    assert_exact(fresh, reference, token_space, dtype)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_with_a_lora_companion_through_transformers(tmp_path, token_space, tied, dtype):
    kw = dict(tied=tied, dtype=dtype)
    base_dir, adapter_dir = make_adapter(tmp_path, token_space, lora=True, **kw)
    reference = legacy_reference(adapter_dir, token_space, **kw)

    by_adapter = AutoModelForCausalLM.from_pretrained(adapter_dir)
    assert_exact(by_adapter, reference, token_space, dtype)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.load_adapter(adapter_dir)
    assert_exact(base, reference, token_space, dtype)
    assert sorted(base.peft_config) == ["default", "lora"]

    by_adapter.save_pretrained(tmp_path / "again")
    assert sorted(os.listdir(tmp_path / "again" / "lora")) == sorted(os.listdir(adapter_dir / "lora"))
    lora_before, lora_after = (load_file(d / "lora" / "adapter_model.safetensors") for d in (adapter_dir, tmp_path / "again"))
    assert lora_before.keys() == lora_after.keys() and all(torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    assert_exact(AutoModelForCausalLM.from_pretrained(tmp_path / "again"), reference, token_space, dtype)


def test_pipeline_with_an_adapter_path_generates_as_the_legacy_model(tmp_path, token_space):
    base_dir, adapter_dir = make_adapter(tmp_path, token_space)
    word_tokenizer(TEXT_VOCAB).save_pretrained(adapter_dir)  # the tokenizer travels with the adapter, as on the Hub
    reference = legacy_reference(adapter_dir, token_space)
    pipe = pipeline("text-generation", model=str(adapter_dir))
    assert_exact(pipe.model, reference, token_space, torch.float32)
    prompt = "w1 w2 w3"
    ids = pipe.tokenizer(prompt, return_tensors="pt").input_ids
    expected = reference.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = pipe(prompt, max_new_tokens=6, do_sample=False, return_tensors=True)
    assert out[0]["generated_token_ids"] == expected[0].tolist()


def test_hub_repo_ids_from_the_offline_cache(tmp_path, token_space, monkeypatch):
    base_dir, adapter_dir = make_adapter(tmp_path, token_space)
    _, newer_dir = make_adapter(tmp_path / "v2", token_space, seed=1)
    cache = tmp_path / "hub-cache"
    for name, value in (("HF_HUB_OFFLINE", True), ("HF_HUB_CACHE", str(cache))):
        monkeypatch.setenv(name, "1" if value is True else value)
        monkeypatch.setattr(constants, name, value)
    commit_to_cache(cache, "org/tiny-base", folder_files(base_dir))
    for directory in (adapter_dir, newer_dir):  # the adapters name the Hub base, as a pushed one would
        config = json.loads((directory / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/tiny-base"}))
    commit_to_cache(cache, "org/rows", folder_files(adapter_dir), refs=("v1",))
    commit_to_cache(cache, "org/rows", folder_files(newer_dir))

    for kwargs, directory in (({}, newer_dir), ({"revision": "v1"}, adapter_dir)):
        reference = legacy_reference(directory, token_space)
        # transformers applies ``revision=`` to the base it then loads: the adapter's goes in adapter_kwargs
        by_id = AutoModelForCausalLM.from_pretrained("org/rows", adapter_kwargs=kwargs)
        assert_exact(by_id, reference, token_space, torch.float32)
        base = AutoModelForCausalLM.from_pretrained("org/tiny-base")
        base.load_adapter("org/rows", adapter_kwargs=kwargs)
        assert_exact(base, reference, token_space, torch.float32)


def test_enable_disable_and_active_adapters_behave_as_through_peft(tmp_path, token_space):
    base_dir, adapter_dir = make_adapter(tmp_path, token_space)
    model = AutoModelForCausalLM.from_pretrained(adapter_dir)
    peft_model = PeftModel.from_pretrained(build_tiny_qwen3(), adapter_dir)
    assert model.active_adapters() == ["default"]
    reference = legacy_reference(adapter_dir, token_space)
    # loaded for inference, an adapter is its own reference: disabled, the model computes with the same rows
    for disable, enable in ((model.disable_adapters, model.enable_adapters),
                            (peft_model.base_model.disable_adapter_layers, peft_model.base_model.enable_adapter_layers)):
        disable()
        assert_exact(model, reference, token_space, torch.float32)
        assert_exact(peft_model, reference, token_space, torch.float32)
        enable()
    assert_exact(model, reference, token_space, torch.float32)

    trainable = AutoModelForCausalLM.from_pretrained(base_dir)
    trainable.load_adapter(adapter_dir, is_trainable=True)
    names = sorted(n for n, p in trainable.named_parameters() if p.requires_grad)
    assert names == ["lm_head.row_extension_output_rows.default", "model.embed_tokens.row_extension_input_rows.default"]


def test_adapters_written_before_the_doors_existed_still_load(tmp_path, token_space):
    """transformers' save_pretrained used to prefix the row keys with ``base_model.model.``: those files load."""
    from safetensors.torch import save_file

    base_dir, adapter_dir = make_adapter(tmp_path, token_space)
    reference = legacy_reference(adapter_dir, token_space)
    rows = saved_rows(adapter_dir)
    save_file({f"base_model.model.{k}": v for k, v in rows.items()}, adapter_dir / WEIGHTS_NAME)
    assert_exact(AutoModelForCausalLM.from_pretrained(adapter_dir), reference, token_space, torch.float32)
    assert_exact(PeftModel.from_pretrained(build_tiny_qwen3(), adapter_dir), reference, token_space, torch.float32)


def test_what_cannot_be_exact_is_refused(tmp_path, token_space):
    base_dir, adapter_dir = make_adapter(tmp_path, token_space)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = uti_peft.RowExtensionConfig(token_space=token_space)
    with pytest.raises(uti_peft.RowExtensionError, match="needs its rows"):
        model.load_adapter(peft_config=config)
    with pytest.raises(uti_peft.RowExtensionError, match="hot-swapped"):
        model.load_adapter(adapter_dir, hotswap=True)
    assert not hasattr(model, "peft_config") and model.config.vocab_size == BASE_ROWS  # untouched
    loaded = AutoModelForCausalLM.from_pretrained(adapter_dir)
    with pytest.raises(uti_peft.RowExtensionError, match="uti-peft push"):
        loaded.save_pretrained(tmp_path / "pushed", push_to_hub=True)
    assert not (tmp_path / "pushed").exists()


@contextlib.contextmanager
def silent_hub(monkeypatch):
    """A loopback "Hub" that accepts connections and never answers: a request would hang, not fail fast."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        yield


@pytest.mark.parametrize("door", ["AutoModelForCausalLM", "AutoPeftModelForCausalLM"])
def test_an_adapter_without_a_base_fails_at_once_saying_to_pass_the_base(tmp_path, token_space, monkeypatch, door):
    model = get_peft_model(build_tiny_qwen3(), uti_peft.RowExtensionConfig(token_space=token_space))
    model.save_pretrained(tmp_path / "adapter")  # built in memory: no base recorded
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    load = {"AutoModelForCausalLM": AutoModelForCausalLM, "AutoPeftModelForCausalLM": AutoPeftModelForCausalLM}[door]
    with silent_hub(monkeypatch):
        start = time.monotonic()
        with pytest.raises(uti_peft.RowExtensionError, match="records no base_model_name_or_path") as raised:
            load.from_pretrained(tmp_path / "adapter")
        assert time.monotonic() - start < 5
    assert "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE)" in str(raised.value)


@pytest.mark.parametrize("door", ["AutoModelForCausalLM", "AutoPeftModelForCausalLM"])
def test_a_moved_adapter_finds_its_local_base_or_fails_at_once(tmp_path, token_space, monkeypatch, door):
    """A base loaded by a relative path ("work/base", as typed to `train --base`) is recorded so that it still
    resolves from any directory; a recorded local base that is gone fails at once, saying to pass the base."""
    monkeypatch.chdir(tmp_path)
    build_tiny_qwen3(vocab_rows=BASE_ROWS).save_pretrained("work/base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained("work/base"),
                           uti_peft.RowExtensionConfig(token_space=token_space))
    train_steps(model, token_space)
    model.save_pretrained("work/adapter")
    recorded = json.loads((tmp_path / "work" / "adapter" / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(tmp_path / "work" / "base")

    load = {"AutoModelForCausalLM": AutoModelForCausalLM, "AutoPeftModelForCausalLM": AutoPeftModelForCausalLM}[door]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the user moved on (or moved the adapter)
    ids = probe_ids(token_space)
    reference = PeftModel.from_pretrained(build_tiny_qwen3(vocab_rows=BASE_ROWS), tmp_path / "work" / "adapter")
    assert torch.equal(logits(load.from_pretrained(tmp_path / "work" / "adapter"), ids), logits(reference, ids))

    os.rename(tmp_path / "work" / "base", tmp_path / "moved-base")
    with silent_hub(monkeypatch):
        start = time.monotonic()
        with pytest.raises(uti_peft.errors.BaseModelNotFoundError) as raised:
            load.from_pretrained(tmp_path / "work" / "adapter")
        assert time.monotonic() - start < 5
    message = str(raised.value)
    assert str(tmp_path / "work" / "base") in message and "does not exist here" in message
    assert "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE)" in message
