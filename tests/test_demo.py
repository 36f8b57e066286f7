"""`uti-peft demo` runs the whole life cycle locally and reports what it checked."""

from uti_peft.cli import main
from uti_peft.demo import run_demo


def test_demo_checks_hold(tmp_path):
    report = run_demo(str(tmp_path), steps=2)
    assert report["loaded_equals_trained"] and report["merged_equals_loaded"]
    assert report["loaded_logits_width"] == report["vocab_size"] == report["loaded_config_vocab_size"]
    assert report["merged_embedding_rows"] == report["vocab_size"]
    assert report["base_rows"] > report["text_vocab_size"]
    assert report["rows_bytes"] == report["trainable_params"] * 4
    assert 0 < report["adapter_file_bytes"] - report["rows_bytes"] < 1024


def test_demo_cli(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "OK: save -> PeftModel.from_pretrained -> merge reproduces the logits exactly" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
