"""An installed uti-peft registers itself the first time peft (or transformers' adapter loading) is used, in
interpreters that never ``import uti_peft``; start-up imports nothing heavy; ``UTI_PEFT_AUTOLOAD=0`` turns it off."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file

import uti_peft
from uti_peft.tiny import build_tiny_qwen3, tiny_token_space

from conftest import legacy_model_for, probe_ids, train_steps

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, *, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, cwd="/")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved base, an adapter naming it, probe ids and the legacy recipe's logits for them."""
    root = tmp_path_factory.mktemp("autoload")
    space = tiny_token_space()
    build_tiny_qwen3().save_pretrained(root / "base")
    model = get_peft_model(build_tiny_qwen3(), uti_peft.RowExtensionConfig(token_space=space))
    train_steps(model, space)
    model.peft_config["default"].base_model_name_or_path = str(root / "base")
    model.save_pretrained(root / "adapter")
    ids = probe_ids(space)
    with torch.no_grad():
        expected = legacy_model_for(root / "adapter", space)(input_ids=ids).logits
    save_file({"ids": ids, "expected": expected}, root / "probe.safetensors")
    return root


def test_start_up_imports_nothing_heavy():
    out = run_python("import sys; print(sorted(m for m in ('torch', 'peft', 'transformers', 'uti_peft', "
                     "'uti_peft_autoload') if m in sys.modules))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['uti_peft_autoload']"]


SCRIPT = """
import sys
from safetensors.torch import load_file, save_file
{load}
assert "uti_peft" in sys.modules  # registered behind the script's back
import torch
probe = load_file("{root}/probe.safetensors")
with torch.no_grad():
    logits = model(input_ids=probe["ids"]).logits
save_file({{"logits": logits.contiguous()}}, "{root}/{name}.safetensors")
"""

LOADS = {
    "peft": "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
            "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{root}/base'), '{root}/adapter')",
    "auto_peft": "from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained('{root}/adapter')",
    "transformers": "from transformers import AutoModelForCausalLM\n"
                    "model = AutoModelForCausalLM.from_pretrained('{root}/adapter')",
}


@pytest.mark.parametrize("door", sorted(LOADS))
def test_a_fresh_interpreter_that_never_imports_uti_peft_loads_exactly(saved, door):
    load = LOADS[door].format(root=saved)
    out = run_python(SCRIPT.format(load=load, root=saved, name=door))
    assert out.returncode == 0, out.stderr[-3000:]
    expected = load_file(saved / "probe.safetensors")["expected"]
    assert torch.equal(load_file(saved / f"{door}.safetensors")["logits"], expected)


def test_the_switch_turns_it_off(saved):
    load = LOADS["peft"].format(root=saved)
    out = run_python(load, env={"UTI_PEFT_AUTOLOAD": "0"})
    assert out.returncode != 0 and "KeyError: 'ROW_EXTENSION'" in out.stderr


def test_the_wheel_installs_the_hook_at_the_root_of_site_packages(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = tmp_path.glob("uti_peft-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {"uti_peft.pth", "uti_peft_autoload.py", "uti_peft/__init__.py"} <= names
        assert archive.read("uti_peft.pth").decode() == (REPO / "uti_peft.pth").read_text()
    # and the installed (editable) environment running these tests has it too
    import uti_peft_autoload
    from uti_peft.constants import AUTOLOAD_ORIGINAL_ATTRIBUTE

    assert uti_peft_autoload.ORIGINAL_ATTRIBUTE == AUTOLOAD_ORIGINAL_ATTRIBUTE  # written out there, not imported

    site_packages = [Path(p) for p in sys.path if p.endswith("site-packages")]
    assert any((p / "uti_peft.pth").is_file() for p in site_packages)
    assert Path(uti_peft_autoload.__file__).resolve() == REPO / "uti_peft_autoload.py"
