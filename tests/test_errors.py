"""Bad input gets a clear error naming the field and both values, and leaves the base model untouched."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

import uti_peft
from uti_peft.constants import WEIGHTS_NAME
from uti_peft.tiny import build_tiny_qwen3

from conftest import TEXT_VOCAB


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [type(m) for m in model.modules()],
        model.config.to_dict(),
    )


def assert_untouched(model, before):
    state, module_types, config = before
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert [type(m) for m in model.modules()] == module_types
    assert model.config.to_dict() == config
    assert not hasattr(model, "peft_config")


def load_expecting(base, adapter, error, *patterns):
    before = snapshot(base)
    with pytest.raises(error) as info:
        PeftModel.from_pretrained(base, adapter)
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, f"{pattern!r} not in {message!r}"
    assert_untouched(base, before)


def edit_config(adapter, edit):
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_hidden_size_mismatch(make_adapter):
    adapter = make_adapter()  # hidden 64
    load_expecting(build_tiny_qwen3(hidden_size=32), adapter, uti_peft.RowExtensionError, "hidden size 64", "hidden size 32")


def test_base_with_fewer_rows_than_text_vocab(make_adapter):
    adapter = make_adapter()
    load_expecting(build_tiny_qwen3(vocab_rows=900), adapter, uti_peft.RowExtensionError, "900 rows", f"{TEXT_VOCAB}")


def test_invalid_token_space(make_adapter):
    adapter = make_adapter()
    edit_config(adapter, lambda c: c["token_space"]["ranges"]["IMAGE"].update(size=255))
    load_expecting(build_tiny_qwen3(), adapter, uti_peft.TokenSpaceError, "ranges.IMAGE.size", "255", "256")


def test_token_space_sha256_mismatch(make_adapter, token_space):
    adapter = make_adapter()
    edit_config(adapter, lambda c: c.update(token_space_sha256="0" * 64))
    load_expecting(build_tiny_qwen3(), adapter, uti_peft.TokenSpaceError, "token_space_sha256", "0" * 64, token_space.sha256())


def test_row_count_mismatch(make_adapter, token_space):
    adapter = make_adapter()
    path = adapter / WEIGHTS_NAME
    rows = load_file(path)
    save_file({k: v[:-1].contiguous() for k, v in rows.items()}, path)
    expected = token_space.num_new_rows
    load_expecting(build_tiny_qwen3(), adapter, uti_peft.RowExtensionError, f"{expected - 1} rows", f"= {expected}")


def test_missing_adapter_file(make_adapter):
    adapter = make_adapter()
    os.remove(adapter / WEIGHTS_NAME)
    load_expecting(build_tiny_qwen3(), adapter, uti_peft.RowExtensionError, WEIGHTS_NAME, str(adapter))


def test_truncated_adapter_file(make_adapter):
    adapter = make_adapter()
    path = adapter / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    load_expecting(build_tiny_qwen3(), adapter, uti_peft.RowExtensionError, WEIGHTS_NAME, str(adapter))


def test_unknown_tensor_in_adapter_file(make_adapter):
    adapter = make_adapter()
    path = adapter / WEIGHTS_NAME
    rows = load_file(path)
    save_file({**rows, "base_model.model.lm_head.weight": torch.zeros(2, 2)}, path)
    load_expecting(build_tiny_qwen3(), adapter, uti_peft.RowExtensionError, "base_model.model.lm_head.weight")


def test_config_fields_must_agree_with_token_space(token_space):
    with pytest.raises(uti_peft.TokenSpaceError, match="vocab_size is 99 but the token space gives 1576"):
        uti_peft.RowExtensionConfig(token_space=token_space, vocab_size=99)
    with pytest.raises(ValueError, match="init_rows is 'zeros'"):
        uti_peft.RowExtensionConfig(token_space=token_space, init_rows="zeros")



def test_head_rows_only_on_an_untied_base_is_refused(make_adapter):
    adapter = make_adapter()
    path = adapter / WEIGHTS_NAME
    rows = load_file(path)
    save_file({"output_embeddings.new_rows": rows["output_embeddings.new_rows"]}, path)
    load_expecting(build_tiny_qwen3(), adapter, uti_peft.RowExtensionError, "lm_head rows only", "model.embed_tokens")
