"""`uti-peft demo` runs the whole life cycle locally; what it writes is checked here independently of what it reports."""

import os

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoTokenizer, pipeline

from uti_peft.cli import main
from uti_peft.demo import BASE_ROWS, run_demo
from uti_peft.constants import INPUT_ROWS_KEY, OUTPUT_ROWS_KEY, WEIGHTS_NAME
from uti_peft.tiny import build_tiny_qwen3

from conftest import legacy_model_for, probe_ids


def test_the_demo_adapter_is_the_rows_and_loads_like_the_legacy_recipe(tmp_path, token_space):
    report = run_demo(str(tmp_path), steps=2)
    adapter = tmp_path / "adapter"
    assert report["adapter_dir"] == str(adapter)

    hidden = build_tiny_qwen3().config.hidden_size
    with safe_open(adapter / WEIGHTS_NAME, framework="pt") as f:  # the file holds the new rows, nothing else
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
        rows = {key: f.get_tensor(key) for key in f.keys()}
    assert shapes == {key: [token_space.num_new_rows, hidden] for key in (INPUT_ROWS_KEY, OUTPUT_ROWS_KEY)}

    # trained: the saved rows moved away from the mean-of-text-rows start
    base = build_tiny_qwen3(vocab_rows=BASE_ROWS)
    text_mean = base.get_input_embeddings().weight[: token_space.text_vocab_size].mean(0)
    assert (rows[INPUT_ROWS_KEY] - text_mean).abs().max() > 1e-2

    ids = probe_ids(token_space)
    loaded = PeftModel.from_pretrained(base, adapter)
    legacy = legacy_model_for(adapter, token_space, vocab_rows=BASE_ROWS)  # resize, resize, copy rows
    with torch.no_grad():
        ours, reference = loaded(ids).logits, legacy(ids).logits
        merged = loaded.merge_and_unload()(ids).logits
    assert ours.shape[-1] == token_space.vocab_size
    assert torch.equal(ours, reference) and torch.equal(merged, reference)


def test_demo_cli_keeps_the_workdir_it_is_given(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "OK: save -> PeftModel.from_pretrained -> merge reproduces the logits exactly" in out
    assert sorted(os.listdir(tmp_path / "adapter")) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "token_space.json",
        "tokenizer.json", "tokenizer_config.json",
    ]
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "base"))
    assert "generated_from_text" in out and "<|pad_mm|>" in out


def test_the_demo_adapter_carries_the_extended_tokenizer_and_generates_from_text(tmp_path):
    run_demo(str(tmp_path), steps=0)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    assert len(tokenizer) == 1576 and tokenizer.pad_token == "<|pad_mm|>"
    assert len(AutoTokenizer.from_pretrained(tmp_path / "base")) == 1000
    generate = pipeline("text-generation", model=str(tmp_path / "adapter"))  # base and tokenizer found from there
    text = generate("The cat", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("The cat") and len(generate.tokenizer(text).input_ids) > 2


def test_demo_never_writes_over_or_beside_other_weights(tmp_path, capsys):
    for occupied in ("base", "adapter"):
        workdir = tmp_path / occupied
        (workdir / occupied).mkdir(parents=True)
        old = {"model.safetensors": b"old weights", "config.json": b"{}", "adapter_model.safetensors": b"old rows",
               "checkpoint-7/notes.txt": b"mine"}
        for name, data in old.items():
            (workdir / occupied / name).parent.mkdir(exist_ok=True)
            (workdir / occupied / name).write_bytes(data)
        capsys.readouterr()
        assert main(["demo", "--workdir", str(workdir), "--steps", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("uti-peft demo: error: ") and err.count("\n") == 1
        assert str(workdir / occupied) in err and "choose another location" in err
        assert {str(p.relative_to(workdir / occupied)): p.read_bytes() for p in (workdir / occupied).rglob("*")
                if p.is_file()} == old
        assert sorted(os.listdir(workdir)) == [occupied]  # the other one was not written either
