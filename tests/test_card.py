"""The model card: rendered from the template with huggingface_hub's ModelCard, written by save_pretrained."""

from __future__ import annotations

import importlib.resources
import json
import os
import re

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model

import uti_peft
from uti_peft.card import ADAPTER_REF_PLACEHOLDER, card_facts, render_model_card, template_path, write_model_card
from uti_peft.files import file_sha256, rows_bytes_of_file
from uti_peft.tiny import build_tiny_qwen3, build_token_space, tiny_token_space

PROVENANCE = {
    "source_checkpoint": "/ckpt/stage3/trainable_rows.pt",
    "source_sha256": "ab" * 32,
    "source_format": "trainable_rows.pt",
    "row_start": 1000,
    "row_end": 1575,
    "dtype": torch.bfloat16,  # not YAML: must come out as its string
}
EVAL = {"loss_mean": {"all": 2.1, "a2t": 1.9, "i2t": 2.5}, "counts": {"all": 100, "a2t": 40}, "split": "val"}


def _config(**kwargs) -> uti_peft.RowExtensionConfig:
    return uti_peft.RowExtensionConfig(token_space=tiny_token_space(), **kwargs)


def _reparse(card: ModelCard) -> ModelCard:
    """What a reader of README.md (the Hub, ModelCard.load) gets back."""
    return ModelCard(str(card))


def test_template_is_packaged_as_uti_peft_model_cards():
    resource = importlib.resources.files("uti_peft.model_cards") / "adapter_card.md"
    assert resource.is_file()
    assert os.path.samefile(template_path(), str(resource))
    assert "{{ card_data }}" in resource.read_text(encoding="utf-8")


def test_metadata_parses_and_names_base_library_tags_and_pipeline():
    card = _reparse(render_model_card(_config(base_model_name_or_path="org/tiny-base"), rows_bytes=294_912))
    data = card.data.to_dict()
    assert data["base_model"] == "org/tiny-base"
    assert data["library_name"] == "peft"
    assert data["pipeline_tag"] == "text-generation"
    assert {"uti-peft", "peft", "image", "audio", "text"} <= set(data["tags"])
    assert "special" not in data["tags"]
    assert "base_model:adapter:org/tiny-base" in data["tags"]
    facts = card_facts(card)
    assert facts["num_new_rows"] == 576 and facts["rows_bytes"] == 294_912
    assert facts["text_vocab_size"] == 1000 and facts["vocab_size"] == 1576
    assert facts["token_space_sha256"] == tiny_token_space().sha256()
    assert "provenance" not in facts and "eval" not in facts


def test_body_has_modality_table_sizes_and_two_line_loading_snippet():
    text = render_model_card(_config(), rows_bytes=294_912).text
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", text, re.MULTILINE)}
    assert list(rows) == ["TEXT", "SPECIAL", "IMAGE", "AUDIO_CB0", "AUDIO_CB1", "AUDIO_CB2", "AUDIO_CB3"]
    assert "| 1064..1319 | 256 |" in rows["IMAGE"] and "AILab-CVC/seed-tokenizer-2" in rows["IMAGE"]
    assert "| 1448..1511 | 64 |" in rows["AUDIO_CB2"]
    assert "facebook/encodec_48khz" in rows["AUDIO_CB2"] and "codebook 2 of 4" in rows["AUDIO_CB2"]
    assert "<\\|pad_mm\\|>" in rows["SPECIAL"]  # pipes escaped: the table stays a table
    assert "576 new rows" in text and "288.00 KiB (294,912 bytes)" in text
    snippet = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    assert "import uti_peft" in snippet
    assert f'PeftModel.from_pretrained(base, "{ADAPTER_REF_PLACEHOLDER}")' in snippet
    # the base of the token space is used when the config names none
    assert 'AutoModelForCausalLM.from_pretrained("uti-peft/tiny-qwen3")' in snippet
    assert "## Evaluation" not in text and "## Provenance" not in text


def test_provenance_and_eval_sections_render_only_when_given():
    card = _reparse(render_model_card(_config(), rows_bytes=10, provenance=PROVENANCE, eval_report=EVAL))
    text = card.text
    assert "## Provenance" in text and "## Evaluation" in text
    assert "| Source checkpoint | `/ckpt/stage3/trainable_rows.pt` |" in text
    assert f"| Source sha256 | `{'ab' * 32}` |" in text
    assert "| Dtype | torch.bfloat16 |" in text
    assert "| Subset | loss_mean | counts |" in text
    assert "| a2t | 1.9 | 40 |" in text
    assert "| i2t | 2.5 | – |" in text  # a subset missing from one metric
    assert "- split: val" in text
    facts = card_facts(card)
    assert facts["provenance"] == {**PROVENANCE, "dtype": "torch.bfloat16"}
    assert facts["eval"] == EVAL
    only_eval = render_model_card(_config(), rows_bytes=10, eval_report=EVAL).text
    assert "## Evaluation" in only_eval and "## Provenance" not in only_eval


def test_local_base_path_is_not_hub_metadata(tmp_path):
    card = _reparse(render_model_card(_config(base_model_name_or_path=str(tmp_path)), rows_bytes=1))
    assert card.data.base_model == "uti-peft/tiny-qwen3"  # the token space's base_text_model
    assert f'from_pretrained("{tmp_path}")' in card.text  # the snippet still names what was used
    space = build_token_space(1000, image_size=256, codebook_size=64, base_text_model="")
    bare = _reparse(render_model_card(uti_peft.RowExtensionConfig(token_space=space), rows_bytes=1))
    assert bare.data.base_model is None and "base_model" not in bare.data.to_dict()


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_writes_the_card(tmp_path, tied):
    model = get_peft_model(build_tiny_qwen3(tied=tied), _config())
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    facts = card_facts(card)
    weights = tmp_path / "adapter_model.safetensors"
    matrices = 1 if tied else 2
    assert facts["rows_bytes"] == rows_bytes_of_file(weights) == 576 * 64 * 4 * matrices
    assert facts["adapter_sha256"] == file_sha256(weights)
    assert card.data.library_name == "peft" and "uti-peft" in card.data.tags
    assert "Row-extension adapter" in card.text and "## Token space" in card.text
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "token_space.json"]


def test_config_alone_writes_no_card(tmp_path):
    _config().save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "token_space.json"]


def test_save_pretrained_carries_provenance_and_only_fresh_eval(tmp_path):
    model = get_peft_model(build_tiny_qwen3(), _config())
    model.save_pretrained(tmp_path)
    write_model_card(tmp_path, model.peft_config["default"], provenance=PROVENANCE, eval_report=EVAL)

    model.save_pretrained(tmp_path)  # same rows: the eval numbers still describe them
    facts = card_facts(ModelCard.load(tmp_path / "README.md"))
    assert facts["provenance"]["source_sha256"] == "ab" * 32
    assert facts["eval"] == EVAL

    with torch.no_grad():
        model.get_input_embeddings().rows("default")[-1] += 1.0  # retrained rows: the old numbers are stale
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    facts = card_facts(card)
    assert facts["provenance"]["source_checkpoint"] == PROVENANCE["source_checkpoint"]
    assert "eval" not in facts and "## Evaluation" not in card.text
    assert facts["adapter_sha256"] == file_sha256(tmp_path / "adapter_model.safetensors")


def test_card_survives_a_reload_and_resave(tmp_path):
    model = get_peft_model(build_tiny_qwen3(), _config())
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(build_tiny_qwen3(), tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")
    for name in ("README.md", "adapter_model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # same document; its key order is not kept (adapter_config.json is written with sorted keys)
    assert json.loads((tmp_path / "a" / "token_space.json").read_text()) == json.loads(
        (tmp_path / "b" / "token_space.json").read_text()
    )
