"""Disabling means the reference rows; several row adapters side by side (set, delete, save one)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import uti_peft
from uti_peft.tiny import build_tiny_qwen3, build_token_space

from conftest import legacy_model_for, probe_ids, train_steps


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def fresh_load(adapter_dir, tied: bool):
    return PeftModel.from_pretrained(build_tiny_qwen3(tied=tied), adapter_dir)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_disabled_model_runs_the_rows_it_started_from(tmp_path, token_space, tied):
    model = get_peft_model(build_tiny_qwen3(tied=tied), uti_peft.RowExtensionConfig(token_space=token_space))
    model.save_pretrained(tmp_path / "start")
    train_steps(model, token_space)
    model.save_pretrained(tmp_path / "trained")
    ids = probe_ids(token_space)
    starting, trained = fresh_load(tmp_path / "start", tied), fresh_load(tmp_path / "trained", tied)
    assert not torch.equal(logits(starting, ids), logits(trained, ids))  # training moved the rows
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), logits(starting, ids))
        # no gradient reaches the rows while disabled (the reference is not trained)
        assert not model(input_ids=ids, labels=ids).loss.requires_grad
    assert torch.equal(logits(model, ids), logits(trained, ids))
    # the reference is one extra copy of the trained rows, not saved
    layers = [m for m in model.modules() if isinstance(m, uti_peft.RowExtensionLayer) and m.tied_to is None]
    assert sum(len(m.row_extension_reference_rows) for m in layers) == (1 if tied else 2)
    assert not any("reference" in key for key in model.state_dict())


def test_disabled_rows_with_lora_is_the_starting_rows_without_the_lora(tmp_path, token_space):
    model = get_peft_model(build_tiny_qwen3(), uti_peft.RowExtensionConfig(token_space=token_space))
    model.save_pretrained(tmp_path / "start")
    uti_peft.add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    train_steps(model, token_space)
    ids = probe_ids(token_space)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), logits(legacy_model_for(tmp_path / "start", token_space), ids))


def test_an_adapter_loaded_for_inference_is_its_own_reference(make_adapter, token_space):
    adapter = make_adapter()
    model = fresh_load(adapter, tied=False)
    ids = probe_ids(token_space)
    expected = logits(legacy_model_for(adapter, token_space), ids)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), expected)
    assert not any(len(m.row_extension_reference_rows) for m in model.modules() if isinstance(m, uti_peft.RowExtensionLayer))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_adapters_side_by_side_switch_exactly(tmp_path, make_adapter, token_space, tied):
    first, second = make_adapter(tied=tied, name="first"), make_adapter(tied=tied, name="second", init_noise_factor=0.5)
    ids = probe_ids(token_space)
    expected = {"default": logits(fresh_load(first, tied), ids), "second": logits(fresh_load(second, tied), ids)}
    assert not torch.equal(expected["default"], expected["second"])
    model = fresh_load(first, tied)
    model.load_adapter(second, adapter_name="second")
    assert torch.equal(logits(model, ids), expected["default"])  # loading beside it leaves the active one alone
    for name in ("second", "default", "second"):
        model.set_adapter(name)
        assert torch.equal(logits(model, ids), expected[name]), name

    model.save_pretrained(tmp_path / "saved", selected_adapters=["second"])
    assert torch.equal(logits(fresh_load(tmp_path / "saved" / "second", tied), ids), expected["second"])

    model.delete_adapter("second")  # the active one: the tail passes to the other
    assert list(model.peft_config) == ["default"]
    assert torch.equal(logits(model, ids), expected["default"])
    restored = model.unload()
    assert restored.get_input_embeddings().weight.shape[0] == 1024
    assert restored.config.vocab_size == build_tiny_qwen3(tied=tied).config.vocab_size


def test_only_one_row_adapter_can_be_active(make_adapter):
    model = fresh_load(make_adapter(name="first"), tied=False)
    model.load_adapter(make_adapter(name="second", init_noise_factor=0.5), adapter_name="second")
    with pytest.raises(uti_peft.RowExtensionError, match=r"set_adapter\(\['default', 'second'\]\): only one"):
        model.base_model.set_adapter(["default", "second"])
    with model.disable_adapter():  # the weight holds the reference rows: switching now would mix them up
        with pytest.raises(uti_peft.RowExtensionError, match="while adapters are disabled"):
            model.set_adapter("second")


def test_adapters_of_another_token_space_are_refused(make_adapter, token_space):
    model = fresh_load(make_adapter(), tied=False)
    other = build_token_space(1000, image_size=128, codebook_size=64, base_text_model="uti-peft/tiny-qwen3")
    with pytest.raises(uti_peft.RowExtensionError, match=r"vocab_size 1448.*vocab_size 1576.*need the same token space"):
        model.add_adapter("other", uti_peft.RowExtensionConfig(token_space=other))
    assert list(model.peft_config) == ["default"]


def test_an_adapter_added_with_another_s_config_starts_as_its_copy(token_space):
    """TRL's reference adapter: ``model.add_adapter("ref", model.peft_config["default"])``."""
    model = get_peft_model(build_tiny_qwen3(), uti_peft.RowExtensionConfig(token_space=token_space))
    train_steps(model, token_space)
    ids = probe_ids(token_space)
    expected = logits(model, ids)
    model.add_adapter("ref", model.peft_config["default"])
    model.set_adapter("ref")
    assert torch.equal(logits(model, ids), expected)
