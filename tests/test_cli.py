"""The ``uti-peft`` command line: one error contract, checks before anything expensive, and a light import.

Every user error prints exactly one line ``uti-peft <command>: error: …`` on stderr and exits with 2;
``--debug`` / ``UTI_PEFT_DEBUG=1`` let the exception (and its traceback) through. Checks that need no model
(paths, repo ids, token ids, the output folder) fail before a model is loaded: the tests replace
``AutoModelForCausalLM.from_pretrained`` by a tripwire that fails the test if it is reached, and point the
Hub at the loopback test server to prove that no request was made.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from importlib import metadata
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
from huggingface_hub import constants
from peft import get_peft_model

import uti_peft
from uti_peft.cli import DEBUG_ENV, build_parser, main
from uti_peft.constants import EXPORT_MARKER_NAME
from uti_peft.hub import use_request_timeout
from uti_peft.tiny import build_tiny_qwen3, tiny_token_space

sys.path.insert(0, str(Path(__file__).parent))
from legacy_fixtures import write_legacy_checkpoint  # noqa: E402
from test_hub import local_hub, online  # noqa: E402,F401  (fixtures: the loopback Hub)

SPACE = tiny_token_space()
HEAVY = ("torch", "transformers", "peft", "huggingface_hub", "safetensors")


def run_python(code: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV} | (env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def one_error_line(err: str, command: str) -> str:
    """The contract: exactly one line on stderr, ``uti-peft <command>: error: …``; returns the message."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    prefix = f"uti-peft {command}: error: " if command else "uti-peft: error: "
    assert lines[0].startswith(prefix), err
    return lines[0][len(prefix):]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny base with its token space, an adapter for it, a legacy checkpoint and a JSONL file."""
    root = tmp_path_factory.mktemp("cli")
    build_tiny_qwen3().save_pretrained(root / "base")
    SPACE.save(root / "base" / "token_space.json")
    get_peft_model(build_tiny_qwen3(), uti_peft.RowExtensionConfig(token_space=SPACE)).save_pretrained(root / "adapter")
    write_legacy_checkpoint(root / "legacy", SPACE)
    image_id = SPACE.ranges["IMAGE"].start  # beyond the base's 1024 rows
    with open(root / "data.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"task": "t2i", "input_ids": [1, 2, 3, image_id, 5]}) + "\n")
        f.write(json.dumps({"task": "a2t", "input_ids": list(range(1, 40))}) + "\n")
    return root


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a model is loaded (the checks must come first)."""

    def tripwire(*args, **kwargs):
        raise AssertionError(f"a model was loaded: from_pretrained{args}")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", tripwire)


# ---------------------------------------------------------------------------------------- import and help
def test_the_cli_imports_no_deep_learning_stack():
    """``import uti_peft.cli`` and every ``--help`` run without importing torch, transformers or peft."""
    code = f"""
        import contextlib, io, sys
        import uti_peft.cli
        parser = uti_peft.cli.build_parser()
        for argv in (["--help"], *([c, "--help"] for c in
                     ("demo", "convert-legacy", "export-legacy", "inspect", "push", "eval", "train"))):
            with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
                parser.parse_args(argv)
            assert "usage: uti-peft" in out.getvalue(), argv
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
    """
    run = run_python(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize("first", ["uti_peft", "peft", "uti_peft.row_extension", "transformers",
                                   "uti_peft, transformers"])
def test_import_uti_peft_still_registers_the_method_with_peft(first):
    """Whatever is imported first, PEFT knows ROW_EXTENSION, and the card writer and the Hub integration are in
    place, once peft is imported; importing uti_peft or transformers alone imports no peft (transformers'
    load_adapter registers first: tests/test_autoload.py)."""
    code = f"""
        import sys
        import {first}
        import uti_peft
        assert ("peft" in sys.modules) == ("{first}" in ("peft", "uti_peft.row_extension"))
        from peft import PeftModel
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        from peft.utils import PeftType
        from uti_peft.hub import push_model
        from uti_peft.row_extension import _compat
        from uti_peft.row_extension.config import AFTER_SAVE
        print(PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.ROW_EXTENSION].__name__,
              hasattr(PeftModel.push_to_hub, "__uti_peft_compat__"), _compat._push_handler is push_model,
              len(AFTER_SAVE) > 0)
    """
    run = run_python(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["RowExtensionConfig", "True", "True", "True"]


def test_version_comes_from_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"uti-peft {metadata.version('uti-peft')}"


def test_help_shows_the_defaults():
    text = build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
    for default in ("(default: 1)", "(default: 2048)", "(default: left)", "(default: float32)", "(default: cpu)"):
        assert default in text, default


# ---------------------------------------------------------------------------------------- the error contract
@pytest.mark.parametrize(
    "argv, command, message",
    [
        (["bogus"], "", "invalid choice: 'bogus'"),
        (["demo", "--steps", "-1"], "demo", "--steps: must be 0 or more, got -1"),
        (["eval", "--base", "b"], "eval", "the following arguments are required: --data"),
        (["eval", "--base", "b", "--data", "d", "--dtype", "int8"], "eval", "invalid choice: 'int8'"),
        (["push", "dir"], "push", "the following arguments are required: REPO_ID"),
        # no abbreviation is taken for an option, and an unknown one is reported by the command it was given to
        (["train", "--tiny", "--data", "d", "--output-dir", "o", "--dtyp", "bfloat16"], "train",
         "unrecognized arguments: --dtyp bfloat16 (did you mean --dtype?)"),
        (["train", "--tiny", "--data", "d", "--output-dir", "o", "--max-step", "3"], "train",
         "unrecognized arguments: --max-step 3"),
        (["demo", "surplus"], "demo", "unrecognized arguments: surplus"),
        (["--verison"], "", "unrecognized arguments: --verison (did you mean --version?)"),
        ([], "", "a COMMAND is required: one of demo, "),
        (["demo", "--steps", "abc"], "demo", "argument --steps: expected an integer, got 'abc'"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(argv, command, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in one_error_line(capsys.readouterr().err, command)


def test_user_errors_fail_before_any_model_or_hub_access(files, online, no_model_loads, capsys):
    data, base = str(files / "data.jsonl"), str(files / "base")
    cases = [
        (["eval", "--base", "./no-such-base", "--data", data], "--base './no-such-base': no such directory"),
        (["eval", "--base", "a/b/c", "--data", data], "--base 'a/b/c': no such directory"),
        (["eval", "--base", "bad id!", "--data", data], "neither an existing directory nor a valid Hub repo id"),
        (["eval", "--base", base, "--adapter", str(files / "legacy"), "--data", data],
         "has no adapter_config.json: not a saved PEFT adapter (files: token_space.json, trainable_rows.json, "
         "trainable_rows.pt; it looks like a legacy row checkpoint: convert it to an adapter first)"),
        (["eval", "--base", base, "--data", data, "--out", str(files / "missing" / "r.json")],
         f"the folder {files / 'missing'} does not exist"),
        (["eval", "--base", base, "--data", str(files / "nope.jsonl")], "nope.jsonl': no such file"),
        (["eval", "--base", base, "--data", data, "--max-seq-len", "1"], "max_seq_len must be >= 2, got 1"),
        (["eval", "--base", base, "--adapter", str(files / "adapter"), "--data", data, "--token-space",
          str(files / "legacy" / "trainable_rows.json")], "trainable_rows.json: missing field 'text_vocab_size'"),
        (["push", str(files / "legacy"), "org/x"], "has no adapter_config.json"),
        (["push", str(files / "adapter"), "./not-a-repo"], "REPO_ID './not-a-repo' is not a valid Hub repo id"),
        (["inspect", str(files / "nothing")], "nothing': no such file or directory; expected a legacy checkpoint"),
        (["train", "--tiny", "--data", data, "--output-dir", str(files / "base" / "config.json")],
         "is a file, not a directory"),
    ]
    for argv, message in cases:
        started = time.monotonic()
        assert main(argv) == 2, argv
        assert message in one_error_line(capsys.readouterr().err, argv[0]), argv
        assert time.monotonic() - started < 10, argv
    assert online.requests == []  # nothing went to the Hub


def test_eval_checks_token_ids_against_the_base_before_loading_it(files, no_model_loads, capsys):
    image_id = SPACE.ranges["IMAGE"].start
    assert main(["eval", "--base", str(files / "base"), "--data", str(files / "data.jsonl")]) == 2
    message = one_error_line(capsys.readouterr().err, "eval")
    assert f"data.jsonl:1: token id {image_id} is beyond the base model's 1024 embedding rows" in message
    assert "--adapter" in message

    bad = files / "bad-ids.jsonl"
    bad.write_text(json.dumps({"task": "t2i", "input_ids": [1, SPACE.vocab_size]}) + "\n")
    assert main(["eval", "--base", str(files / "base"), "--adapter", str(files / "adapter"), "--data", str(bad)]) == 2
    assert f"bad-ids.jsonl:1: input_ids has token id {SPACE.vocab_size}, outside the token space" in (
        one_error_line(capsys.readouterr().err, "eval"))


def test_debug_lets_the_exception_through(files, monkeypatch):
    argv = ["eval", "--base", "./no-such-base", "--data", str(files / "data.jsonl")]
    with pytest.raises(FileNotFoundError, match="no-such-base"):
        main(["--debug", *argv])
    with pytest.raises(FileNotFoundError, match="no-such-base"):
        main([argv[0], "--debug", *argv[1:]])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError, match="no-such-base"):
        main(argv)


def test_a_traceback_is_never_printed_without_debug(files):
    """In a real process: the console script prints one line (no traceback) and exits with 2."""
    run = run_python(
        f"import sys; from uti_peft.cli import main; sys.exit(main(['inspect', {str(files / 'nothing')!r}]))"
    )
    assert run.returncode == 2
    assert "no such file or directory; expected a legacy checkpoint" in one_error_line(run.stderr, "inspect")


def test_a_path_that_does_not_exist_fails_before_torch_is_imported(files, tmp_path):
    """Every command checks its paths first: a typo costs no import of the deep-learning stack (seconds on a busy
    machine). Run in a fresh process, which records what each failing command had imported."""
    missing = str(tmp_path / "missing")
    occupied = tmp_path / "occupied"
    (occupied / "base").mkdir(parents=True)
    (occupied / "base" / "model.safetensors").write_text("old")
    data = str(files / "data.jsonl")
    cases = [
        ["demo", "--workdir", str(occupied)],
        ["inspect", missing],
        ["convert-legacy", missing, "-o", str(tmp_path / "out")],
        ["convert-legacy", str(files / "legacy"), "-o", str(tmp_path / "out"), "--lora", missing],
        ["export-legacy", missing, "-o", str(tmp_path / "out")],
        ["push", missing, "org/name"],
        ["merge", missing, str(files / "adapter"), "-o", str(tmp_path / "out")],
        ["merge", str(files / "base"), missing, "-o", str(tmp_path / "out")],
        ["eval", "--base", str(files / "base"), "--adapter", missing, "--data", data],
        ["eval", "--base", str(files / "base"), "--data", missing],
        ["train", "--base", missing, "--data", data, "--output-dir", str(tmp_path / "run")],
        ["train", "--tiny", "--data", missing, "--output-dir", str(tmp_path / "run")],
        ["train", "--tiny", "--data", data, "--init-adapter", missing, "--output-dir", str(tmp_path / "run")],
    ]
    run = run_python(f"""
        import contextlib, io, json, sys
        from uti_peft.cli import main
        results = []
        for argv in {cases!r}:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(argv)
            results.append((code, err.getvalue(), sorted(m for m in {HEAVY!r} if m in sys.modules)))
        print(json.dumps(results))
    """)
    assert run.returncode == 0, run.stderr
    for argv, (code, err, imported) in zip(cases, json.loads(run.stdout)):
        assert code == 2, (argv, err)
        assert "missing" in one_error_line(err, argv[0]) or "occupied" in err, (argv, err)
        assert "torch" not in imported, (argv, imported)


# ---------------------------------------------------------------------------------------- the network
class SilentEndpoint:
    """A loopback socket that accepts connections and never answers (a Hub behind a black hole)."""

    def __enter__(self) -> "SilentEndpoint":
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        return self

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def hub_endpoint(monkeypatch):
    """Point huggingface_hub at a URL (env and the constants it parsed at import), with a fresh HTTP session."""

    def point(url: str, timeout: int) -> None:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_TOKEN", "hf_loopback_only")
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", timeout)
        monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", url)
        huggingface_hub.close_session()

    yield point
    huggingface_hub.close_session()  # the next user gets a session without our timeout


def test_push_to_an_endpoint_that_never_answers_fails_within_the_timeout(files, hub_endpoint, capsys):
    with SilentEndpoint() as silent:
        hub_endpoint(silent.url, timeout=1)
        started = time.monotonic()
        assert main(["push", str(files / "adapter"), "org/rows"]) == 2
        elapsed = time.monotonic() - started
    message = one_error_line(capsys.readouterr().err, "push")
    assert message.startswith(f"no answer from {silent.url} (ReadTimeout")
    assert "HF_HUB_DOWNLOAD_TIMEOUT" in message
    # huggingface_hub tries twice (1 s each, 1 s backoff): well under the 60 s a push may take at the default
    # (the second connection may still sit in the listen backlog when the command returns: not counted exactly)
    assert silent.connections and elapsed < 15


def test_the_default_request_timeout_bounds_a_push_to_a_minute():
    """The default (HF_HUB_DOWNLOAD_TIMEOUT = 10 s) per request, two tries and a 1 s backoff: at most ~21 s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    run = subprocess.run([sys.executable, "-c", "from uti_peft.hub import use_request_timeout; "
                          "print(use_request_timeout())"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    seconds = float(run.stdout)
    assert 0 < seconds and 2 * seconds + 1 <= 60


def test_push_to_an_unreachable_endpoint_is_one_line(files, hub_endpoint, capsys):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connections are refused
        hub_endpoint(f"http://127.0.0.1:{port}", timeout=1)
        assert main(["push", str(files / "adapter"), "org/rows"]) == 2
    message = one_error_line(capsys.readouterr().err, "push")
    assert message.startswith(f"cannot reach http://127.0.0.1:{port} (ConnectError")


def test_use_request_timeout_keeps_a_timeout_the_user_set(hub_endpoint):
    hub_endpoint("http://127.0.0.1:9", timeout=10)
    session = huggingface_hub.get_session()
    session.timeout = type(session.timeout)(3.0)
    assert use_request_timeout() == 3.0


# ---------------------------------------------------------------------------------------- commands
def test_demo_with_zero_steps_works_and_removes_its_temp_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert main(["demo", "--steps", "0"]) == 0
    out = capsys.readouterr()
    assert "OK: save -> PeftModel.from_pretrained -> merge reproduces the logits exactly" in out.out
    assert "training_steps             0" in out.out
    assert "note: --steps 0: nothing was trained" in out.out  # said, not only implied by a number
    assert os.listdir(tmp_path) == []  # the temp dir is gone
    assert out.err == ""  # no warning from our code on the happy path


def test_eval_prints_a_summary_with_the_truncated_count(files, capsys):
    out = files / "report.json"
    argv = ["eval", "--base", str(files / "base"), "--adapter", str(files / "adapter"), "--data",
            str(files / "data.jsonl"), "--max-seq-len", "16", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["truncated"] == 1  # the 39-token example; the 5-token one fits
    printed = capsys.readouterr()
    assert f"wrote {out}: 2 examples, {report['tokens']['all']} scored tokens, 1 truncated to 16 tokens" in printed.out
    assert "warning" not in printed.err


def test_export_legacy_overwrite_replaces_its_own_output_only(files, tmp_path, capsys):
    original = tmp_path / "original"
    write_legacy_checkpoint(original, SPACE)
    before = {p.name: p.read_bytes() for p in original.iterdir()}
    assert main(["export-legacy", str(files / "adapter"), "-o", str(original), "--overwrite"]) == 2
    assert "holds no .uti-peft-export.json" in one_error_line(capsys.readouterr().err, "export-legacy")
    assert {p.name: p.read_bytes() for p in original.iterdir()} == before  # the original checkpoint is intact

    export = tmp_path / "export"
    assert main(["export-legacy", str(files / "adapter"), "-o", str(export)]) == 0
    marker = json.loads((export / EXPORT_MARKER_NAME).read_text())
    assert marker["source_adapter"] == str(files / "adapter")
    (export / "stale.txt").write_text("from an earlier export")
    assert main(["export-legacy", str(files / "adapter"), "-o", str(export), "--overwrite"]) == 0
    assert sorted(p.name for p in export.iterdir()) == sorted(
        [EXPORT_MARKER_NAME, "token_space.json", "trainable_rows.json", "trainable_rows.pt"]
    )


def test_our_warnings_are_one_line_without_the_source_line(tmp_path, capsys):
    embeddings = torch.randn(SPACE.num_new_rows, 64).to(torch.bfloat16)
    embeddings[5, 3] = float("nan")
    write_legacy_checkpoint(tmp_path / "ckpt", SPACE, pt_overrides={"embeddings": embeddings, "lm_head": None})
    argv = ["convert-legacy", str(tmp_path / "ckpt"), "-o", str(tmp_path / "adapter"), "--allow-nonfinite"]
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"uti-peft convert-legacy: warning: {tmp_path / 'ckpt' / 'trainable_rows.pt'}: embeddings has NaN/Inf values "
        f"in 1 row(s), token ids [{SPACE.text_vocab_size + 5}] (kept: allow_nonfinite)"
    ]
