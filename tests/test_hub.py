"""The Hub: push (model.push_to_hub and ``uti-peft push``), load by repo id, AutoPeftModel, actionable errors.

No network: pushes and online loads go to `hub_server.LocalHub` on 127.0.0.1, offline loads resolve a Hub
cache laid out by `hub_cache` through huggingface_hub's own resolution code.

huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_CACHE / HF_HUB_DISABLE_XET once, at import; the
in-process fixtures therefore set the variables *and* the values it parsed from them (`constants`), and
`test_env_var_flow_in_a_fresh_process` runs the user's flow in a new interpreter with only the variables set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import huggingface_hub.hf_api
import pytest
import safetensors.torch
import torch
from huggingface_hub import ModelCard, constants
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import uti_peft
from uti_peft import cli
from uti_peft.card import card_facts
from uti_peft.files import file_sha256
from uti_peft.constants import INPUT_ROWS_KEY, OUTPUT_ROWS_KEY
from uti_peft.errors import (
    AdapterNotFoundError,
    BaseModelMismatchError,
    BaseModelMismatchWarning,
    RowExtensionError,
    WrongAdapterTypeError,
)
from uti_peft.adapter_location import locate_adapter
from uti_peft.adapter_folder import check_adapter_folder
from uti_peft.row_extension.base_check import check_base_model, same_model_name
from uti_peft.tiny import build_tiny_qwen3, tiny_token_space

sys.path.insert(0, str(Path(__file__).parent))
from hub_cache import commit_to_cache, folder_files  # noqa: E402
from hub_server import LocalHub  # noqa: E402

SPACE = tiny_token_space()
BASE_ID = "org/tiny-base"
IDS = torch.tensor([[0, 7, 999, 1000, 1009, 1100, 1400, 1575]])
ROWS_BYTES = 2 * SPACE.num_new_rows * 64 * 4  # input + lm_head rows, float32, hidden 64
# what a push must upload, written out here (not read from uti_peft.hub) so the tests can disagree with the code
FOUR_FILES = {"adapter_config.json", "adapter_model.safetensors", "token_space.json", "README.md"}


def commit_requests(hub: LocalHub, repo_id: str) -> list[dict]:
    """The commit calls the server received for ``repo_id`` (one per ``create_commit``)."""
    return [r for r in hub.requests if r["method"] == "POST" and r["path"].startswith(f"/api/models/{repo_id}/commit/")]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def adapter_model(bump: float = 0.0, *, hidden_size: int = 64, adapter_name: str = "default"):
    """A row-extension model on the tiny base, rows shifted by ``bump`` so that versions differ."""
    model = get_peft_model(
        build_tiny_qwen3(hidden_size=hidden_size), uti_peft.RowExtensionConfig(token_space=SPACE),
        adapter_name=adapter_name,
    )
    model.peft_config[adapter_name].base_model_name_or_path = BASE_ID
    with torch.no_grad():
        model.get_input_embeddings().rows(adapter_name).add_(bump)
        model.get_output_embeddings().rows(adapter_name).sub_(bump)
    return model


def tiny_tokenizer(size: int):
    """A made-up WordLevel tokenizer of ``size`` tokens (what may be saved beside an adapter)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The base (as saved by transformers) and two versions of an adapter, saved locally, with their logits."""
    root = tmp_path_factory.mktemp("saved")
    build_tiny_qwen3().save_pretrained(root / "base")
    out = {"root": root, "base": root / "base"}
    for name, bump in (("v1", 0.0), ("v2", 0.5)):
        model = adapter_model(bump)
        model.save_pretrained(root / name)
        out[name] = root / name
        out[f"{name}_logits"] = logits(PeftModel.from_pretrained(build_tiny_qwen3(), root / name))
        assert torch.equal(out[f"{name}_logits"], logits(model))
    assert not torch.equal(out["v1_logits"], out["v2_logits"])
    return out


@pytest.fixture(scope="module")
def local_hub():
    with LocalHub() as hub:
        yield hub


@pytest.fixture
def online(monkeypatch, tmp_path, local_hub):
    url = local_hub.url
    for name, value in {"HF_ENDPOINT": url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_loopback_only"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    # huggingface_hub's module-level functions (file_exists, list_repo_files, ...) are methods of one HfApi
    # built at import, which copied the endpoint then
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", url)
    return local_hub


@pytest.fixture
def offline(monkeypatch, tmp_path):
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def populate_cache(cache: Path, saved: dict) -> str:
    """Base at main; adapter ``org/rows``: v1 (tag ``v1``), then v2 at main with v1 also under ``legacy/``."""
    commit_to_cache(cache, BASE_ID, folder_files(saved["base"]))
    old = commit_to_cache(cache, "org/rows", folder_files(saved["v1"]), refs=("v1",))
    commit_to_cache(cache, "org/rows", {**folder_files(saved["v2"]), **folder_files(saved["v1"], "legacy/")})
    return old


# ---------------------------------------------------------------------- push
def test_model_push_to_hub_uploads_exactly_the_four_files(online, tmp_path):
    model = adapter_model(0.25)
    info = model.push_to_hub("org/push-four", private=True, commit_message="Add rows")

    initial, commit = online.commits_of("org/push-four")  # the repo's creation, then exactly one upload
    assert len(commit_requests(online, "org/push-four")) == 1
    assert info.oid == commit.oid and commit.summary == "Add rows" and commit.parent == initial.oid
    assert set(commit.added) == FOUR_FILES and set(commit.files) == FOUR_FILES | {".gitattributes"}
    assert online.created[-1] == {"name": "push-four", "organization": "org", "visibility": "private"}
    assert commit.lfs_paths == ["adapter_model.safetensors"]  # LFS basic transfer, like the real Hub
    assert any(r["path"] == "/api/validate-yaml" for r in online.requests)

    weights = commit.added["adapter_model.safetensors"]
    header_len = int.from_bytes(weights[:8], "little")
    assert len(weights) == 8 + header_len + ROWS_BYTES  # the rows, nothing else
    tensors = safetensors.torch.load(weights)
    assert set(tensors) == {INPUT_ROWS_KEY, OUTPUT_ROWS_KEY}
    assert torch.equal(tensors[INPUT_ROWS_KEY], model.get_input_embeddings().rows("default"))
    assert torch.equal(tensors[OUTPUT_ROWS_KEY], model.get_output_embeddings().weight[SPACE.text_vocab_size:])

    card = ModelCard(commit.added["README.md"].decode())
    assert card.data.base_model == BASE_ID and card.data.library_name == "peft"
    assert card.data.pipeline_tag == "text-generation"
    assert {"uti-peft", "image", "audio"} <= set(card.data.tags)
    assert card_facts(card)["rows_bytes"] == ROWS_BYTES

    model.save_pretrained(tmp_path / "local")  # a local directory and the Hub repo look the same
    for name in FOUR_FILES:
        assert (tmp_path / "local" / name).read_bytes() == commit.added[name], name


def test_push_to_a_branch_then_load_by_id_with_revision_and_subfolder(online, saved):
    online.commit(BASE_ID, {p: f.read_bytes() for p, f in folder_files(saved["base"]).items()})
    model = adapter_model(0.75)
    model.push_to_hub("org/push-rev", revision="dev")
    assert set(online.files("org/push-rev", "main")) == {".gitattributes"}
    assert FOUR_FILES <= set(online.files("org/push-rev", "dev"))

    second = adapter_model(-0.5, adapter_name="extra")  # a non-default name goes to its subfolder, as PEFT saves it
    second.push_to_hub("org/push-rev", revision="dev", commit_message="extra")
    assert {f"extra/{name}" for name in FOUR_FILES} <= set(online.files("org/push-rev", "dev"))

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_ID), "org/push-rev", revision="dev")
    assert torch.equal(logits(loaded), logits(model))
    loaded = PeftModel.from_pretrained(build_tiny_qwen3(), "org/push-rev", revision="dev", subfolder="extra")
    assert torch.equal(logits(loaded), logits(second))
    with pytest.raises(AdapterNotFoundError, match=r"'org/push-rev' has no adapter_config.json"):
        uti_peft.RowExtensionConfig.from_pretrained("org/push-rev")  # main has no adapter


def test_push_of_rows_plus_lora_uploads_both_and_loads_by_id_in_one_call(online, saved):
    online.commit(BASE_ID, {p: f.read_bytes() for p, f in folder_files(saved["base"]).items()})
    model = adapter_model(0.3)
    uti_peft.add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.push_to_hub("org/rows-lora", revision="dev")

    assert len(online.commits_of("org/rows-lora")) == 2 and len(commit_requests(online, "org/rows-lora")) == 1
    commit = online.commits_of("org/rows-lora")[-1]
    assert set(commit.added) == {*FOUR_FILES, "lora/adapter_config.json", "lora/adapter_model.safetensors"}
    assert card_facts(ModelCard(commit.added["README.md"].decode()))["lora_adapter"] == "lora"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_ID), "org/rows-lora", revision="dev")
    assert set(loaded.peft_config) == {"default", "lora"}
    assert torch.equal(logits(loaded), logits(model))


def test_cli_push_uploads_the_directory(online, saved, tmp_path, capsys):
    rc = cli.main(
        ["push", str(saved["v1"]), "org/cli-push", "--private", "--revision", "dev", "--commit-message", "From CLI"]
    )
    assert rc == 0, capsys.readouterr().err
    assert len(online.commits_of("org/cli-push")) == 2 and len(commit_requests(online, "org/cli-push")) == 1
    commit = online.commits_of("org/cli-push")[-1]
    assert commit.summary == "From CLI" and online.repos["org/cli-push"].private
    assert online.repos["org/cli-push"].branches["dev"] == commit.oid
    assert set(commit.added) == FOUR_FILES
    for name in FOUR_FILES:
        assert (saved["v1"] / name).read_bytes() == commit.added[name], name
    assert commit.oid in capsys.readouterr().out

    # no card, or PEFT's generic one: ours is rendered for the upload, the directory is left as it was
    bare = tmp_path / "bare"
    shutil.copytree(saved["v1"], bare)
    (bare / "README.md").unlink()
    generic = tmp_path / "generic"
    shutil.copytree(saved["v1"], generic)
    (generic / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n")
    # a card of other weights (rows replaced by hand) is not pushed as is either
    stale = tmp_path / "stale"
    shutil.copytree(saved["v1"], stale)
    shutil.copy(saved["v2"] / "adapter_model.safetensors", stale / "adapter_model.safetensors")
    for folder in (bare, generic, stale):
        before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
        assert cli.main(["push", str(folder), "org/cli-push"]) == 0
        card = ModelCard(online.files("org/cli-push")["README.md"].decode())
        assert card_facts(card)["rows_bytes"] == ROWS_BYTES and "uti-peft" in card.data.tags
        assert card_facts(card)["adapter_sha256"] == file_sha256(folder / "adapter_model.safetensors")
        assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before


def test_cli_push_refuses_what_is_not_a_rows_only_row_extension_adapter(online, saved, tmp_path, capsys):
    lora = tmp_path / "lora"
    LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(lora)
    whole = tmp_path / "whole"
    shutil.copytree(saved["v1"], whole)
    rows = safetensors.torch.load_file(whole / "adapter_model.safetensors")
    rows["base_model.model.model.embed_tokens.weight"] = torch.zeros(1576, 64)
    safetensors.torch.save_file(rows, whole / "adapter_model.safetensors")
    no_space = tmp_path / "no-space"
    shutil.copytree(saved["v1"], no_space)
    (no_space / "token_space.json").unlink()
    cases = {
        lora: r"peft_type is 'LORA', not 'ROW_EXTENSION'",
        whole: r"does not know: .*embed_tokens.weight.*must hold .input_embeddings.new_rows.",
        no_space: r"has no token_space.json",
        tmp_path / "nowhere": r"nowhere': no such file or directory",
    }
    for folder, message in cases.items():
        assert cli.main(["push", str(folder), "org/cli-refused"]) == 2
        assert re.search(message, capsys.readouterr().err), message
    assert "org/cli-refused" not in online.repos  # refused before anything was created


def test_the_token_is_sent_and_private_repos_need_it(online, saved, monkeypatch, tmp_path):
    """The server checks Authorization like the Hub: the push carries the token, a private repo is invisible
    without it (and with a wrong one), a public one is readable anonymously; loads take the default Xet path."""
    adapter_model(0.5).push_to_hub("org/private-rows", private=True)
    sent = {r["authorization"] for r in online.requests if "/org/private-rows" in r["path"] or r["path"] ==
            "/api/repos/create"}
    assert sent == {"Bearer hf_loopback_only"}
    online.commit("org/public-rows", {p: f.read_bytes() for p, f in folder_files(saved["v1"]).items()})

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # downloads need no Xet server (see hub_server)
    loaded = PeftModel.from_pretrained(build_tiny_qwen3(), "org/private-rows")  # HF_TOKEN is set: allowed
    assert torch.equal(logits(loaded), logits(adapter_model(0.5)))

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "anonymous-cache"))
    with pytest.raises(AdapterNotFoundError, match=r"no model repo 'org/private-rows' .*\(or no access to it\)"):
        uti_peft.RowExtensionConfig.from_pretrained("org/private-rows")
    assert online.requests[-1]["authorization"] is None
    with pytest.raises(AdapterNotFoundError, match=r"'org/private-rows'"):
        uti_peft.RowExtensionConfig.from_pretrained("org/private-rows", token="hf_wrong")
    assert online.requests[-1]["authorization"] == "Bearer hf_wrong"
    loaded = PeftModel.from_pretrained(build_tiny_qwen3(), "org/public-rows")  # public: no token needed
    assert torch.equal(logits(loaded), saved["v1_logits"])


# ---------------------------------------------------------------------- load by repo id
def test_load_by_repo_id_from_the_offline_cache(offline, saved):
    old = populate_cache(offline, saved)
    for kwargs, expected in (
        ({}, "v2_logits"),
        ({"revision": "v1"}, "v1_logits"),
        ({"revision": old}, "v1_logits"),
        ({"subfolder": "legacy"}, "v1_logits"),
    ):
        base = AutoModelForCausalLM.from_pretrained(BASE_ID)
        loaded = PeftModel.from_pretrained(base, "org/rows", **kwargs)
        assert torch.equal(logits(loaded), saved[expected]), kwargs


def test_auto_peft_model_by_repo_id_fetches_the_base_from_the_cache(offline, saved):
    populate_cache(offline, saved)
    model = AutoPeftModelForCausalLM.from_pretrained("org/rows")
    assert model.peft_config["default"].base_model_name_or_path == BASE_ID
    assert torch.equal(logits(model), saved["v2_logits"])
    assert torch.equal(logits(AutoPeftModelForCausalLM.from_pretrained("org/rows", revision="v1")), saved["v1_logits"])


@pytest.mark.parametrize("tokenizer_size", [SPACE.text_vocab_size, SPACE.vocab_size])
def test_auto_peft_model_with_a_tokenizer_beside_the_adapter_stays_exact(offline, saved, tmp_path, tokenizer_size):
    """PEFT's AutoPeftModel resizes the base to len(tokenizer) when a tokenizer is saved beside the adapter."""
    populate_cache(offline, saved)
    folder = tmp_path / "with-tokenizer"
    shutil.copytree(saved["v2"], folder)
    tiny_tokenizer(tokenizer_size).save_pretrained(folder)
    model = AutoPeftModelForCausalLM.from_pretrained(str(folder))
    base_rows_before_injection = model.base_model._original_config[0]
    # peft 0.21 resizes only to grow: the full-vocabulary tokenizer grows 1024 -> 1576 rows (mean_resizing)
    assert base_rows_before_injection == max(1024, tokenizer_size)
    assert torch.equal(logits(model), saved["v2_logits"])
    assert torch.equal(
        model.get_input_embeddings().weight[: SPACE.text_vocab_size],
        build_tiny_qwen3().get_input_embeddings().weight[: SPACE.text_vocab_size],
    )


def test_a_base_shrunk_to_the_text_vocabulary_loads_exactly(saved):
    """What AutoPeftModel does with a text-only tokenizer when it shrinks (the issue's Qwen case)."""
    base = build_tiny_qwen3()
    text_rows = base.get_input_embeddings().weight[: SPACE.text_vocab_size].clone()
    head_rows = base.get_output_embeddings().weight[: SPACE.text_vocab_size].clone()
    base.resize_token_embeddings(SPACE.text_vocab_size)  # transformers' default mean_resizing
    assert torch.equal(base.get_input_embeddings().weight, text_rows)
    assert torch.equal(base.get_output_embeddings().weight, head_rows)
    assert torch.equal(logits(PeftModel.from_pretrained(base, saved["v1"])), saved["v1_logits"])


# ---------------------------------------------------------------------- errors a user can act on
def test_errors_offline_say_what_is_missing(offline, saved):
    populate_cache(offline, saved)
    base = build_tiny_qwen3()
    cases = {
        ("org/missing", None): r"'org/missing' is not in the local Hub cache .*HF_HUB_OFFLINE=1",
        (BASE_ID, None): r"cached 'org/tiny-base' .* has no adapter_config.json.*looks like a full model",
        ("org/rows", "v9"): r"revision 'v9' of 'org/rows' is not in the local Hub cache .*cached: main, v1",
    }
    # uti-peft's own entry points explain (PEFT's own calls keep PEFT's messages: nothing of PEFT is patched for this)
    for (repo, revision), message in cases.items():
        with pytest.raises(AdapterNotFoundError, match=message) as caught:
            uti_peft.RowExtensionConfig.from_pretrained(repo, revision=revision)
        assert isinstance(caught.value, ValueError)  # what PEFT raised, with the reason added
        with pytest.raises(AdapterNotFoundError, match=message):
            locate_adapter(repo, revision=revision)
    with pytest.raises(AdapterNotFoundError, match=r"no adapter directory './no/such/dir'"):
        uti_peft.RowExtensionConfig.from_pretrained("./no/such/dir")
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        PeftModel.from_pretrained(base, "org/missing")
    assert base.get_input_embeddings().weight.shape == (1024, 64)  # the base was not touched


def test_errors_online_say_what_is_missing(online, saved):
    online.commit("org/nested", {p: f.read_bytes() for p, f in folder_files(saved["v1"], "rows/").items()})
    base = build_tiny_qwen3()
    load = uti_peft.RowExtensionConfig.from_pretrained
    with pytest.raises(AdapterNotFoundError, match=r"no model repo 'org/nope' on http://127\.0\.0\.1:\d+ .*hf auth login"):
        load("org/nope")
    with pytest.raises(AdapterNotFoundError, match=r"'org/nested' has no adapter_config.json.*subfolders \['rows'\]"):
        load("org/nested")
    with pytest.raises(AdapterNotFoundError, match=r"'org/nested' has no revision 'v9'"):
        load("org/nested", subfolder="rows", revision="v9")
    loaded = PeftModel.from_pretrained(base, "org/nested", subfolder="rows")
    assert torch.equal(logits(loaded), saved["v1_logits"])


def test_wrong_or_unknown_peft_type(saved, tmp_path):
    lora = tmp_path / "lora"
    LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(lora)
    with pytest.raises(WrongAdapterTypeError, match=r"holds a LORA adapter, not a uti-peft ROW_EXTENSION adapter"):
        uti_peft.RowExtensionConfig.from_pretrained(str(lora))
    with pytest.raises(WrongAdapterTypeError, match="LORA"):
        check_adapter_folder(lora)
    unknown = tmp_path / "unknown"
    shutil.copytree(saved["v1"], unknown)
    config = json.loads((unknown / "adapter_config.json").read_text())
    (unknown / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "FANCY_ROWS"}))
    with pytest.raises(WrongAdapterTypeError, match=r"peft_type 'FANCY_ROWS', which no installed PEFT method"):
        uti_peft.RowExtensionConfig.from_pretrained(str(unknown))


def test_adapter_for_a_base_of_another_hidden_size_fails_naming_the_repo(offline, tmp_path):
    adapter_model(hidden_size=32).save_pretrained(tmp_path / "h32")
    commit_to_cache(offline, "org/rows-h32", folder_files(tmp_path / "h32"))
    base = build_tiny_qwen3()
    with pytest.raises(RowExtensionError, match=r"org/rows-h32.*hidden size 32.*hidden size 64"):
        PeftModel.from_pretrained(base, "org/rows-h32")
    assert base.get_input_embeddings().weight.shape == (1024, 64)


def test_check_base_model_errors_on_shapes_and_warns_on_names():
    config = uti_peft.RowExtensionConfig(token_space=SPACE, base_model_name_or_path="Qwen/Qwen3-8B-Base")
    base = build_tiny_qwen3()
    base.name_or_path = "org/other-base"
    with pytest.warns(BaseModelMismatchWarning, match=r"saved from base 'Qwen/Qwen3-8B-Base' .* onto 'org/other-base'"):
        check_base_model(config, base, adapter_hidden_size=64)
    with pytest.raises(BaseModelMismatchError, match=r"made for 'Qwen/Qwen3-8B-Base' with hidden size 4096; .*hidden size 64"):
        check_base_model(config, base, adapter_hidden_size=4096)
    with pytest.raises(BaseModelMismatchError, match=r"keeps 1000 text rows .* only 900 embedding rows"):
        check_base_model(config, build_tiny_qwen3(vocab_rows=900))
    for same in ("Qwen/Qwen3-8B-Base", "/hf/hub/models--Qwen--Qwen3-8B-Base/snapshots/0123abc", "/models/qwen3-8b-base/", ""):
        base.name_or_path = same
        with warnings.catch_warnings():
            warnings.simplefilter("error", BaseModelMismatchWarning)
            check_base_model(config, base, adapter_hidden_size=64)
    assert not same_model_name("Qwen/Qwen3-8B-Base", "Qwen/Qwen3-4B-Base")



def test_loading_onto_a_differently_named_base_warns(saved):
    base = build_tiny_qwen3()
    base.name_or_path = "org/other-base"  # the adapter was saved from org/tiny-base
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(base, saved["v1"])
    assert torch.equal(logits(loaded), saved["v1_logits"])  # a warning, not an error: the shapes fit
    mismatch = [w for w in caught if issubclass(w.category, BaseModelMismatchWarning)]
    assert mismatch
    assert "'org/tiny-base'" in str(mismatch[0].message) and "'org/other-base'" in str(mismatch[0].message)

# ---------------------------------------------------------------------- the user's flow, env vars only
SCRIPT = """
import json, torch
import uti_peft
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from uti_peft.tiny import tiny_token_space

report = {"wired": hasattr(PeftModel.push_to_hub, "__uti_peft_compat__")}
import uti_peft.hub  # a no-op once uti_peft.register() installs the Hub integration

ids = torch.tensor([[0, 7, 999, 1000, 1009, 1100, 1400, 1575]])
model = get_peft_model(AutoModelForCausalLM.from_pretrained("org/env-base"),
                       uti_peft.RowExtensionConfig(token_space=tiny_token_space()))
with torch.no_grad():
    model.get_input_embeddings().rows("default").add_(0.125)
    expected = model(ids).logits
info = model.push_to_hub("org/env-rows", commit_message="rows from a fresh process")
auto = AutoPeftModelForCausalLM.from_pretrained("org/env-rows")  # tokenizer beside the adapter: resized base
with torch.no_grad():
    got = auto(ids).logits
report.update(commit=info.oid, equal=torch.equal(got, expected), rows_before=auto.base_model._original_config[0])
print("REPORT " + json.dumps(report))
"""


def test_env_var_flow_in_a_fresh_process(local_hub, saved, tmp_path):
    """HF_ENDPOINT/HF_HUB_DISABLE_XET set before anything is imported; plain ``import uti_peft``; push; then
    AutoPeftModelForCausalLM by id, with a full-vocabulary tokenizer in the repo (PEFT resizes the base)."""
    local_hub.commit("org/env-base", {p: f.read_bytes() for p, f in folder_files(saved["base"]).items()})
    tiny_tokenizer(SPACE.vocab_size).save_pretrained(tmp_path / "tok")
    local_hub.commit("org/env-rows", {p: f.read_bytes() for p, f in folder_files(tmp_path / "tok").items()})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(
        HF_ENDPOINT=local_hub.url, HF_HUB_DISABLE_XET="1", HF_HUB_CACHE=str(tmp_path / "cache"),
        HF_TOKEN="hf_loopback_only", HF_HUB_DISABLE_TELEMETRY="1",
    )
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.split("REPORT ", 1)[1])
    commit = local_hub.repos["org/env-rows"].commits[report["commit"]]
    assert set(commit.added) == FOUR_FILES and len(commit_requests(local_hub, "org/env-rows")) == 1
    assert json.loads(commit.added["adapter_config.json"])["base_model_name_or_path"] == "org/env-base"
    card = ModelCard(commit.added["README.md"].decode())
    assert card.data.base_model == "org/env-base" and card_facts(card)["rows_bytes"] == ROWS_BYTES
    assert report["rows_before"] == SPACE.vocab_size  # the trap was sprung: 1024 -> 1576 rows by mean_resizing
    assert report["equal"]
    assert report["wired"]  # plain `import uti_peft` installed the Hub integration

