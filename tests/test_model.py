"""The PEFT life cycle of a row-extension adapter on real tiny Qwen3 models, compared tensor for tensor."""

from __future__ import annotations

import copy

import json
import os
import struct
import warnings

import pytest
import torch
from accelerate import dispatch_model
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM

import uti_peft
from uti_peft.constants import INPUT_ROWS_KEY, OUTPUT_ROWS_KEY, WEIGHTS_NAME
from uti_peft.tiny import build_tiny_qwen3

from conftest import BASE_ROWS, TEXT_VOCAB, legacy_model_for, probe_ids, saved_rows, train_steps

DTYPES = [torch.float32, torch.bfloat16]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_loaded_adapter_matches_legacy_patched_model_exactly(make_adapter, token_space, tied, dtype):
    adapter = make_adapter(tied=tied, dtype=dtype)
    model = PeftModel.from_pretrained(build_tiny_qwen3(tied=tied, dtype=dtype), adapter)
    legacy = legacy_model_for(adapter, token_space, tied=tied, dtype=dtype)
    ids = probe_ids(token_space)

    ours = logits(model, ids)
    assert ours.shape[-1] == token_space.vocab_size
    assert ours.dtype == dtype
    assert torch.equal(ours, logits(legacy, ids))
    assert model.config.vocab_size == token_space.vocab_size
    assert model.config.pad_token_id == token_space.pad_token_id == legacy.config.pad_token_id
    # rows keep the base dtype: PEFT's adapter-dtype autocast did not upcast them
    assert {p.dtype for p in model.parameters()} == {dtype}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_matches_the_legacy_loader_with_transformers_default_mean_resizing(make_adapter, token_space, tied):
    """Our users' loader called resize_token_embeddings with transformers' default (mean_resizing=True)."""
    adapter = make_adapter(tied=tied)
    legacy = legacy_model_for(adapter, token_space, tied=tied, mean_resizing=True)
    model = PeftModel.from_pretrained(build_tiny_qwen3(tied=tied), adapter)
    ids = probe_ids(token_space)
    assert torch.equal(logits(model, ids), logits(legacy, ids))
    merged = model.merge_and_unload()
    assert torch.equal(merged.get_input_embeddings().weight, legacy.get_input_embeddings().weight)


@pytest.mark.parametrize("vocab_rows", [TEXT_VOCAB, 1576, 1700], ids=["text-rows", "total-rows", "more-rows"])
def test_base_row_count_does_not_matter(make_adapter, token_space, vocab_rows):
    adapter = make_adapter()
    model = PeftModel.from_pretrained(build_tiny_qwen3(vocab_rows=vocab_rows), adapter)
    legacy = legacy_model_for(adapter, token_space, vocab_rows=vocab_rows)
    ids = probe_ids(token_space)
    assert torch.equal(logits(model, ids), logits(legacy, ids))


def test_save_writes_rows_only(make_adapter, token_space, tmp_path):
    # a base on disk whose config.json has the original vocab: PEFT's "vocab changed, save the whole embedding
    # layers" rule would fire here without uti_peft
    base_dir = tmp_path / "base"
    build_tiny_qwen3().save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, uti_peft.RowExtensionConfig(token_space=token_space))
    assert model.peft_config["default"].base_model_name_or_path == str(base_dir)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path / "adapter")
    assert not [w for w in caught if "save_embedding_layers" in str(w.message)]

    rows = saved_rows(tmp_path / "adapter")
    assert set(rows) == {INPUT_ROWS_KEY, OUTPUT_ROWS_KEY}
    hidden = base.config.hidden_size
    assert all(r.shape == (token_space.num_new_rows, hidden) for r in rows.values())

    path = tmp_path / "adapter" / WEIGHTS_NAME
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    rows_bytes = sum(r.numel() * r.element_size() for r in rows.values())
    assert os.path.getsize(path) == 8 + header_len + rows_bytes
    assert header_len < 1024

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ROW_EXTENSION"
    assert config["token_space"] == token_space.to_dict()
    assert config["token_space_sha256"] == token_space.sha256()
    assert (config["text_vocab_size"], config["vocab_size"]) == (token_space.text_vocab_size, token_space.vocab_size)
    on_disk = uti_peft.TokenSpace.from_file(tmp_path / "adapter" / "token_space.json")
    assert on_disk == token_space


def test_tied_model_saves_one_set_of_rows(make_adapter):
    rows = saved_rows(make_adapter(tied=True))
    assert set(rows) == {INPUT_ROWS_KEY}


def test_a_tied_head_registered_before_the_embedding_loads_exactly(make_adapter, token_space):
    """PEFT injects in the order of ``named_modules``; a tied head must still wait for the embedding's layer."""

    def head_first(model):
        model._modules = {"lm_head": model._modules.pop("lm_head"), **model._modules}
        return model

    adapter = make_adapter(tied=True)
    base = head_first(build_tiny_qwen3(tied=True))
    assert [name for name, _ in base.named_children()] == ["lm_head", "model"]
    loaded = PeftModel.from_pretrained(base, adapter).eval()
    legacy = legacy_model_for(adapter, token_space, tied=True).eval()
    ids = probe_ids(token_space)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, legacy(input_ids=ids).logits)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_only_new_rows_train(token_space, tied):
    base = build_tiny_qwen3(tied=tied)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, uti_peft.RowExtensionConfig(token_space=token_space))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    hidden = base.config.hidden_size
    assert len(trainable) == (1 if tied else 2)
    assert all(p.shape == (token_space.num_new_rows, hidden) for p in trainable.values())
    assert model.get_nb_trainable_parameters()[0] == len(trainable) * token_space.num_new_rows * hidden
    initial = {n: p.detach().clone() for n, p in trainable.items()}

    optimizer = train_steps(model, token_space, steps=3)

    state_shapes = {tuple(t.shape) for s in optimizer.state.values() for t in s.values() if t.dim() > 0}
    assert state_shapes == {(token_space.num_new_rows, hidden)}
    assert all(not torch.equal(p, initial[n]) for n, p in trainable.items())
    for name, param in model.named_parameters():
        assert (param.grad is None) or param.requires_grad, name
    after = model.get_base_model().state_dict()
    for key, value in before.items():
        if "embed_tokens" in key or "lm_head" in key:
            value, now = value[:TEXT_VOCAB], after[key.replace(".weight", ".base_layer.weight")][:TEXT_VOCAB]
        else:
            now = after[key]
        assert torch.equal(value, now), key


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_row_gradients_equal_full_matrix_gradients(token_space, tied):
    """The custom backward gives exactly the slice [text_vocab_size:] of the full-matrix gradient."""
    model = get_peft_model(build_tiny_qwen3(tied=tied), uti_peft.RowExtensionConfig(token_space=token_space))
    rows = {n: p for n, p in model.named_parameters() if p.requires_grad}
    reference = build_tiny_qwen3(tied=tied)
    reference.resize_token_embeddings(token_space.vocab_size, mean_resizing=False)
    reference.load_state_dict(_merged_state(model))
    ids = probe_ids(token_space)

    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    reference.train()
    reference(input_ids=ids, labels=ids).loss.backward()

    embed_grad = reference.get_input_embeddings().weight.grad[TEXT_VOCAB:]
    ours = {name.split(".")[-2]: p.grad for name, p in rows.items()}
    torch.testing.assert_close(ours["row_extension_input_rows"], embed_grad, rtol=1e-5, atol=1e-7)
    if not tied:
        head_grad = reference.get_output_embeddings().weight.grad[TEXT_VOCAB:]
        torch.testing.assert_close(ours["row_extension_output_rows"], head_grad, rtol=1e-5, atol=1e-7)


def _merged_state(peft_model) -> dict[str, torch.Tensor]:
    """The effective weights of a PeftModel under the plain model's names, without unloading it."""
    return copy.deepcopy(peft_model).merge_and_unload().state_dict()


def test_merge_and_unload_gives_a_plain_model_that_round_trips(make_adapter, token_space, tmp_path):
    adapter = make_adapter()
    model = PeftModel.from_pretrained(build_tiny_qwen3(), adapter)
    ids = probe_ids(token_space)
    expected = logits(model, ids)

    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert type(merged.get_input_embeddings()) is torch.nn.Embedding
    assert type(merged.get_output_embeddings()) is torch.nn.Linear
    assert merged.get_input_embeddings().num_embeddings == token_space.vocab_size
    assert merged.get_output_embeddings().out_features == token_space.vocab_size
    assert torch.equal(logits(merged, ids), expected)

    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert reloaded.config.vocab_size == token_space.vocab_size
    assert reloaded.config.pad_token_id == token_space.pad_token_id
    assert torch.equal(logits(reloaded, ids), expected)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("vocab_rows", [BASE_ROWS, 1576], ids=["padded-base", "total-rows-base"])
def test_unload_restores_the_base_bit_exactly(make_adapter, tied, vocab_rows):
    base = build_tiny_qwen3(tied=tied, vocab_rows=vocab_rows)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    original_config = (base.config.vocab_size, base.config.pad_token_id)

    model = PeftModel.from_pretrained(base, make_adapter(tied=tied))
    restored = model.unload()

    state = restored.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert (restored.config.vocab_size, restored.config.pad_token_id) == original_config
    assert restored.get_input_embeddings().num_embeddings == vocab_rows
    assert restored.get_output_embeddings().out_features == vocab_rows
    assert (restored.lm_head.weight is restored.model.embed_tokens.weight) == tied


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_generate_with_modality_ids_matches_legacy(make_adapter, token_space, tied):
    adapter = make_adapter(tied=tied)
    model = PeftModel.from_pretrained(build_tiny_qwen3(tied=tied), adapter)
    legacy = legacy_model_for(adapter, token_space, tied=tied)
    special = token_space.special_tokens
    prompt = torch.tensor(
        [[special["<|text_start|>"], 5, 17, special["<|text_end|>"], special["<|gen_aud|>"], special["<|aud_start|>"]]]
    )
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=token_space.pad_token_id)
    ours = model.generate(input_ids=prompt, **kwargs)
    assert ours.shape == (1, prompt.shape[1] + 12)
    assert torch.equal(ours, legacy.generate(input_ids=prompt, **kwargs))


def test_low_cpu_mem_usage_on_a_dispatched_base_with_a_layer_offloaded_to_disk(make_adapter, token_space, tmp_path):
    adapter = make_adapter(dtype=torch.bfloat16)
    build_tiny_qwen3(dtype=torch.bfloat16).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", device_map="auto", low_cpu_mem_usage=True, dtype=torch.bfloat16
    )
    # a decoder layer offloaded to disk (its weights on the meta device, read back by accelerate's hook at each
    # forward); the embedding and lm_head stay on the CPU, as extending them requires
    device_map = {name: "cpu" for name in ("model.embed_tokens", "model.layers.0", "model.norm", "model.rotary_emb")}
    device_map.update({"model.layers.1": "disk", "lm_head": "cpu"})
    base = dispatch_model(base, device_map=device_map, offload_dir=str(tmp_path / "offload"), force_hooks=True)
    offloaded = base.model.layers[1]
    assert offloaded.self_attn.q_proj.weight.device.type == "meta"
    assert any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in offloaded.modules())
    assert hasattr(base.get_input_embeddings(), "_hf_hook")

    model = PeftModel.from_pretrained(base, adapter, low_cpu_mem_usage=True)
    legacy = legacy_model_for(adapter, token_space, dtype=torch.bfloat16)
    ids = probe_ids(token_space)
    assert torch.equal(logits(model, ids), logits(legacy, ids))


def test_trainable_load_resumes_training(make_adapter, token_space):
    adapter = make_adapter()
    model = PeftModel.from_pretrained(build_tiny_qwen3(), adapter, is_trainable=True)
    rows = [p for p in model.parameters() if p.requires_grad]
    assert len(rows) == 2
    before = [r.detach().clone() for r in rows]
    train_steps(model, token_space, steps=1)
    assert all(not torch.equal(a, b) for a, b in zip(before, rows))


def test_config_accepts_token_space_forms(token_space, tmp_path):
    token_space.save(tmp_path / "space.json")
    configs = [
        uti_peft.RowExtensionConfig(token_space=token_space),
        uti_peft.RowExtensionConfig(token_space=token_space.to_dict()),
        uti_peft.RowExtensionConfig(token_space=str(tmp_path / "space.json")),
    ]
    for config in configs:
        assert config.peft_type == "ROW_EXTENSION"
        assert config.task_type == "CAUSAL_LM"
        assert config.text_vocab_size == token_space.text_vocab_size
        assert config.vocab_size == token_space.vocab_size
        assert config.pad_token_id == token_space.special_tokens["<|pad_mm|>"]
        assert config.token_space_sha256 == token_space.sha256()


@pytest.mark.parametrize("init_rows", ["mean", "mean_noise"])
def test_init_strategies(token_space, init_rows):
    base = build_tiny_qwen3()
    text_rows = base.get_input_embeddings().weight[:TEXT_VOCAB].detach().double()
    model = get_peft_model(base, uti_peft.RowExtensionConfig(token_space=token_space, init_rows=init_rows))
    rows = model.get_base_model().get_input_embeddings().rows("default").detach().double()
    mean = text_rows.mean(0)
    if init_rows == "mean":
        assert torch.allclose(rows, mean.expand_as(rows).float().double())
    else:
        noise_std = (rows - mean).std(0) / text_rows.std(0)
        assert torch.allclose(noise_std, torch.full_like(noise_std, 0.02), rtol=0.15)


def test_registration_uses_peft_registries():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    assert PeftType("ROW_EXTENSION") is PeftType.ROW_EXTENSION
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.ROW_EXTENSION] is uti_peft.RowExtensionConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.ROW_EXTENSION] is uti_peft.RowExtensionModel
    uti_peft.register()  # idempotent
    assert list(PeftType).count(PeftType.ROW_EXTENSION) == 1


def test_head_rows_mean_trains_and_saves_input_rows_only(token_space, tmp_path):
    base = build_tiny_qwen3()
    head_text_mean = base.get_output_embeddings().weight[:TEXT_VOCAB].detach().double().mean(0).float()
    with pytest.warns(UserWarning, match="set to the\\s+mean of its text rows"):
        model = get_peft_model(base, uti_peft.RowExtensionConfig(token_space=token_space, head_rows="mean"))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.model.model.embed_tokens.row_extension_input_rows.default"
    ]
    head = model.get_base_model().get_output_embeddings().base_layer.weight[TEXT_VOCAB:]
    assert torch.equal(head, head_text_mean.expand_as(head))
    model.save_pretrained(tmp_path / "a")
    assert set(saved_rows(tmp_path / "a")) == {INPUT_ROWS_KEY}
