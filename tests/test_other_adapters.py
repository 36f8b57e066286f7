"""uti-peft lives in every process that imports peft: for an adapter that is not ours it behaves as if it were not
installed, on every supported version, even when an internal it needs is gone; ours then fails with one clear error.

The plain adapter is a real PEFT LoRA (non-zero B, so it changes the logits) saved from a tiny Qwen3; every door
must give the logits of the PeftModel it was saved from.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from packaging.version import Version
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, pipeline

import uti_peft
from uti_peft.row_extension import versions
from uti_peft.tiny import build_tiny_qwen3

from conftest import TEXT_VOCAB, probe_ids
from test_tokenizer import word_tokenizer
from test_transformers_doors import make_adapter as make_row_adapter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def plain_lora(tmp_path_factory):
    """A saved base (with tokenizer), a LoRA adapter that records it (with tokenizer), and its reference logits."""
    root = tmp_path_factory.mktemp("plain-lora")
    base = build_tiny_qwen3()
    base.save_pretrained(root / "base")
    word_tokenizer(TEXT_VOCAB).save_pretrained(root / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    model = get_peft_model(build_tiny_qwen3(), config)
    model.peft_config["default"].base_model_name_or_path = str(root / "base")
    model.save_pretrained(root / "lora")
    word_tokenizer(TEXT_VOCAB).save_pretrained(root / "lora")
    ids = torch.randint(0, TEXT_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    return root, ids, logits(model, ids), model


def load_through(door: str, root) -> torch.nn.Module:
    base_dir, lora_dir = str(root / "base"), str(root / "lora")
    if door == "PeftModel.from_pretrained":
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), lora_dir)
    if door == "AutoPeftModelForCausalLM":
        return AutoPeftModelForCausalLM.from_pretrained(lora_dir)
    if door == "AutoModelForCausalLM(adapter)":
        return AutoModelForCausalLM.from_pretrained(lora_dir)
    if door == "load_adapter":
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        model.load_adapter(lora_dir, adapter_name="plain")
        return model
    if door == "load_adapter(peft_config=, adapter_state_dict=)":
        saved = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), lora_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        model.load_adapter(peft_config=saved.peft_config["default"],
                           adapter_state_dict=get_peft_model_state_dict(saved))
        return model
    if door == "pipeline":
        return pipeline("text-generation", model=lora_dir).model
    raise AssertionError(door)


DOORS = ["PeftModel.from_pretrained", "AutoPeftModelForCausalLM", "AutoModelForCausalLM(adapter)", "load_adapter",
         "load_adapter(peft_config=, adapter_state_dict=)", "pipeline"]


@pytest.mark.parametrize("door", DOORS)
def test_a_plain_lora_loads_through_every_door_with_uti_peft_installed(plain_lora, door):
    root, ids, expected, _ = plain_lora
    import peft.tuners.lora as lora

    model = load_through(door, root)
    assert any(isinstance(m, lora.LoraLayer) for m in model.modules())
    assert torch.allclose(logits(model, ids), expected, atol=1e-5, rtol=0)
    assert not uti_peft.row_extension._compat.carries_row_extension(model)


def test_saving_and_counting_a_plain_lora_is_peft_own(plain_lora, tmp_path):
    """Our save and count patches step aside: the LoRA keys and nothing else, PEFT's own counts."""
    from safetensors.torch import load_file

    root, ids, expected, model = plain_lora
    model.save_pretrained(tmp_path / "again")
    keys = load_file(tmp_path / "again" / "adapter_model.safetensors").keys()
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), tmp_path / "again")
    assert torch.allclose(logits(again, ids), expected, atol=1e-5, rtol=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.get_nb_trainable_parameters() == (trainable, sum(p.numel() for p in model.parameters()))


def _remove_load_report(monkeypatch):
    """Make the internal our load_adapter branch builds unavailable where our branch looks for it, leaving the
    binding transformers' own loader uses: from 5.1 it is deleted from ``utils.loading_report`` (transformers keeps
    its own import in ``modeling_utils``); on 5.0, where ``modeling_utils`` needs it, our branch is pointed where
    5.1 moved it and 5.0 lacks it — the move that broke uti-peft on 5.0."""
    from uti_peft.row_extension import _compat

    if versions.is_transformers_ge_v5_1_0:
        import transformers.utils.loading_report as where

        monkeypatch.delattr(where, "LoadStateDictInfo")
    else:
        monkeypatch.setattr(_compat, "is_transformers_ge_v5_1_0", True)


def test_with_an_internal_gone_a_plain_lora_still_loads_and_ours_fails_clearly(plain_lora, tmp_path, token_space,
                                                                              monkeypatch):
    root, ids, expected, _ = plain_lora
    base_dir, adapter_dir = make_row_adapter(tmp_path, token_space)
    _remove_load_report(monkeypatch)

    for door in ("load_adapter", "AutoModelForCausalLM(adapter)"):
        assert torch.allclose(logits(load_through(door, root), ids), expected, atol=1e-5, rtol=0)

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with pytest.raises(uti_peft.UnsupportedVersionError) as raised:
        model.load_adapter(adapter_dir)
    message = str(raised.value)
    assert "row-extension adapter" in message and "LoadStateDictInfo" in message
    assert f"transformers {versions.TRANSFORMERS}" in message and "tested with transformers 5.0.0 to 5.25.x" in message
    assert raised.value.versions["peft"] == str(versions.PEFT)
    assert not hasattr(model, "peft_config") and model.config.vocab_size == 1024  # untouched
    with pytest.raises(uti_peft.UnsupportedVersionError):
        AutoModelForCausalLM.from_pretrained(adapter_dir)


def test_without_transformers_find_adapter_config_file_ours_is_still_recognised(plain_lora, tmp_path, token_space,
                                                                                 monkeypatch):
    """The check "is this ours?" must not fall through to transformers' loader, which would leave fresh rows."""
    import transformers.utils

    root, ids, expected, _ = plain_lora
    base_dir, adapter_dir = make_row_adapter(tmp_path, token_space)
    monkeypatch.delattr(transformers.utils, "find_adapter_config_file")
    assert torch.allclose(logits(load_through("load_adapter", root), ids), expected, atol=1e-5, rtol=0)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.load_adapter(adapter_dir)
    reference = PeftModel.from_pretrained(build_tiny_qwen3(), adapter_dir)
    assert torch.equal(logits(model, probe_ids(token_space)), logits(reference, probe_ids(token_space)))


REGISTRATION_FAILS = """
import importlib.abc, sys, warnings
class Gone(importlib.abc.MetaPathFinder):  # uti-peft's method cannot be imported on this "version"
    def find_spec(self, name, path=None, target=None):
        if name == "uti_peft.row_extension":
            raise ImportError("simulated: an internal uti-peft needs is gone")
sys.meta_path.insert(0, Gone())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    by_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{root}/base"), "{root}/lora")
    by_transformers = AutoModelForCausalLM.from_pretrained("{root}/lora")
ids = torch.load("{root}/ids.pt")
with torch.no_grad():
    assert torch.allclose(by_peft(input_ids=ids).logits, by_transformers(input_ids=ids).logits, atol=1e-5, rtol=0)
ours = [str(w.message) for w in caught if "uti-peft could not register" in str(w.message)]
assert len(ours) == 1, ours
print("OK", ours[0])
"""


def test_when_registration_fails_peft_and_transformers_work_as_without_uti_peft(plain_lora):
    root, ids, _, _ = plain_lora
    torch.save(ids, root / "ids.pt")
    out = subprocess.run([sys.executable, "-c", REGISTRATION_FAILS.format(root=root)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK uti-peft could not register the ROW_EXTENSION method (ImportError: simulated" in out.stdout


# ---------------------------------------------------------------------- item 3: tested ranges, one warning
def test_tested_ranges_are_ranges_and_an_untested_version_warns_once(monkeypatch):
    assert versions.is_tested("transformers", Version("5.0.0")) and versions.is_tested("transformers", Version("5.25.1"))
    assert not versions.is_tested("transformers", Version("4.57.6"))
    assert not versions.is_tested("transformers", Version("5.26.0"))
    assert versions.is_tested("peft", Version("0.21.0")) and not versions.is_tested("peft", Version("0.22.0"))
    monkeypatch.setattr(versions, "TRANSFORMERS", Version("5.26.0"))
    monkeypatch.setattr(versions, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        versions.warn_once_if_untested()
        versions.warn_once_if_untested()
    assert len(caught) == 1
    assert str(caught[0].message).startswith(
        "uti-peft is tested with transformers 5.0.0 to 5.25.x and peft 0.21.0 to 0.21.x; found transformers 5.26.0")


def test_the_gate_patch_is_applied_only_while_transformers_asks_for_a_newer_peft():
    """transformers' MIN_PEFT_VERSION (0.18 in 5.0, 0.22 in 5.24+) decides; other models keep transformers' check."""
    import transformers.integrations.peft as hf_peft

    gated = hasattr(hf_peft.PeftAdapterMixin.active_adapters, "__uti_peft_compat__")
    assert gated == (Version(hf_peft.MIN_PEFT_VERSION) > versions.PEFT)


# ---------------------------------------------------------------------- item 1: declared = tested
def _floors_declared() -> dict[str, str]:
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    found = {}
    for requirement in dependencies:
        name, _, spec = requirement.partition(">=")
        if name in ("transformers", "peft"):
            assert "<" not in spec, f"{requirement}: an upper bound would block a release the other package requires"
            found[name] = spec
    return found


def test_the_declared_floors_are_what_the_floor_job_installs_and_what_versions_call_tested():
    declared = _floors_declared()
    assert declared == {dist: low for dist, (low, _) in versions.CHECKED_WITH.items()}
    with open(os.path.join(REPO, ".ci", "floor-constraints.txt")) as f:
        pins = dict(line.strip().split("==") for line in f if "==" in line and not line.startswith("#"))
    assert {k: pins[k] for k in declared} == declared
    with open(os.path.join(REPO, ".ci", "run")) as f:
        assert "floor-constraints.txt" in f.read()
