"""Checks the command line makes before anything expensive: paths, model sources, token spaces, data ids.

A value that names an existing local path is used as such and never sent to the Hub; one that cannot be a
Hub repo id (``./x``, ``/abs/x``, ``a/b/c``, ...) and does not exist fails at once, saying it is neither.
Each check raises a ``ValueError`` / ``FileNotFoundError`` naming the option and the value.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from ..constants import CONFIG_NAME, TOKEN_SPACE_NAME
from ..paths import model_source


# ---------------------------------------------------------------------------------------- paths
def existing_file(value: Optional[str], option: str) -> Optional[str]:
    """``value`` if it is None or a readable file."""
    if value is None:
        return None
    if not os.path.isfile(value):
        what = "a directory" if os.path.isdir(value) else "no such file"
        raise FileNotFoundError(f"{option} {value!r}: {what}; expected a file")
    return value


def existing_path(value: Optional[str], option: str, expected: str) -> Optional[str]:
    """``value`` if it is None or exists (file or directory); checked before any heavy import."""
    if value is not None and not os.path.exists(value):
        raise FileNotFoundError(f"{option} {value!r}: no such file or directory; expected {expected}")
    return value


def existing_dir(value: Optional[str], option: str, expected: str) -> Optional[str]:
    """``value`` if it is None or a directory."""
    if value is not None and not os.path.isdir(existing_path(value, option, expected)):
        raise NotADirectoryError(f"{option} {value!r} is a file; expected {expected}")
    return value


def writable_file(value: Optional[str], option: str) -> Optional[str]:
    """``value`` if it is None or a file that can be written: its folder exists and is writable."""
    if value is None:
        return None
    if os.path.isdir(value):
        raise ValueError(f"{option} {value!r} is a directory; expected a file path")
    folder = os.path.dirname(os.path.abspath(value))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{option} {value!r}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{option} {value!r}: the folder {folder} is not writable")
    return value


def writable_dir(value: str, option: str) -> str:
    """``value`` if it is a writable directory or can be created (its nearest existing parent is writable)."""
    path = os.path.abspath(value)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {value!r} exists and is not a directory")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise PermissionError(f"{option} {value!r}: {probe} is not a writable directory")
    return value


# ---------------------------------------------------------------------------------------- token spaces
def adapter_token_space(adapter: str, option: str):
    """The token space of an adapter (local directory or Hub id), read from its ``adapter_config.json`` only."""
    from ..adapter_location import locate_adapter
    from ..adapter_folder import check_peft_type
    from ..token_space import TokenSpace

    if not os.path.isdir(adapter):
        model_source(adapter, option)
    config_file = locate_adapter(adapter)  # a local directory without the file fails here, saying what it holds
    with open(config_file, encoding="utf-8") as f:
        raw = json.load(f)
    check_peft_type(raw.get("peft_type"), where=f"{option} {adapter}: {CONFIG_NAME}")
    return TokenSpace(raw.get("token_space") or {}, source=f"{config_file} token_space")


def token_space_for(
    token_space: Optional[str], adapter: Optional[str], base: Optional[str], *, tiny: bool = False,
    adapter_option: str = "--adapter",
):
    """``--token-space``, else the adapter's, else the tiny one, else ``token_space.json`` in the base directory."""
    from ..token_space import TokenSpace, resolve_token_space

    if token_space:
        return TokenSpace.from_file(existing_file(token_space, "--token-space"))
    if adapter:
        return adapter_token_space(adapter, adapter_option)
    if tiny:
        from ..tiny import tiny_token_space

        return tiny_token_space()
    space = resolve_token_space(None, base) if base and os.path.isdir(base) else None
    if space is None:
        where = f"the base directory {base}" if base and os.path.isdir(base) else "a Hub base"
        raise FileNotFoundError(f"no {TOKEN_SPACE_NAME} in {where} and no adapter; pass --token-space")
    return space


# ---------------------------------------------------------------------------------------- data
def read_checked_examples(path: str, token_space, max_seq_len: int, side: str) -> list:
    """Read the JSONL and check every id against the token space (naming the file and line of a bad one)."""
    from ..data import check_window, prepare, read_jsonl

    check_window(max_seq_len, side)
    examples = read_jsonl(existing_file(path, "--data"))
    if not examples:
        raise ValueError(f"--data {path}: no examples")
    for example in examples:
        prepare(example, token_space, max_seq_len, side)
    return examples


def base_rows(base: str) -> Optional[int]:
    """The base model's vocabulary size from its config (no weights are read); None if it does not say."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    return getattr(config.get_text_config(), "vocab_size", None)


def check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r}: {exc}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available here (torch {torch.__version__})")


def bound_hub_requests() -> None:
    """Every Hub request of this command times out (`uti_peft.hub.use_request_timeout`)."""
    from ..hub import use_request_timeout

    use_request_timeout()


# ---------------------------------------------------------------------------------------- commands
@dataclass
class EvalPlan:
    base: str
    adapter: Optional[str]
    token_space: Any
    examples: list


def prepare_eval(args: argparse.Namespace) -> EvalPlan:
    """Everything ``uti-peft eval`` needs, checked, before the model is loaded (paths before any heavy import)."""
    writable_file(args.out, "--out")
    base = model_source(args.base, "--base")
    existing_file(args.data, "--data")
    existing_file(args.token_space, "--token-space")
    if args.adapter:
        model_source(args.adapter, "--adapter")
    check_device(args.device)
    bound_hub_requests()
    space = token_space_for(args.token_space, args.adapter, base)
    examples = read_checked_examples(args.data, space, args.max_seq_len, args.truncation_side)
    if not args.adapter:
        rows = base_rows(base)
        biggest = max((max(e.input_ids), e.source) for e in examples)
        if rows is not None and biggest[0] >= rows:
            raise ValueError(
                f"{biggest[1]}: token id {biggest[0]} is beyond the base model's {rows} embedding rows (--base {base} "
                f"alone knows ids 0..{rows - 1}); pass the --adapter that adds the new rows"
            )
    return EvalPlan(base, args.adapter, space, examples)


def check_extract(args: argparse.Namespace) -> None:
    """``uti-peft extract``: the token space file, BASE and SOURCE (directories or Hub ids) and the output."""
    existing_file(args.token_space, "--token-space")
    model_source(args.base, "BASE")
    model_source(args.source, "SOURCE")
    writable_dir(args.output, "--output")
    bound_hub_requests()


def check_train(args: argparse.Namespace) -> None:
    """Sources, output and resume paths, the token space and every data id of ``uti-peft train``."""
    from ..output_dir import check_output_dir

    # the output directory's rules (nothing is written), as training applies them again, and every path: all
    # before torch is imported, so that a typo fails at once
    check_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint, args.init_adapter)
    writable_dir(args.output_dir, "--output-dir")
    if args.base:
        model_source(args.base, "--base")
    if args.init_adapter:
        model_source(args.init_adapter, "--init-adapter")
    existing_file(args.data, "--data")
    existing_file(args.token_space, "--token-space")
    existing_file(args.deepspeed, "--deepspeed")
    if args.rank_state_dir:
        writable_dir(args.rank_state_dir, "--rank-state-dir")
    from ..distributed import check_launch_environment

    check_launch_environment(args.deepspeed)
    bound_hub_requests()
    space = token_space_for(args.token_space, args.init_adapter, args.base, tiny=bool(args.tiny),
                            adapter_option="--init-adapter")
    if args.init_adapter and args.token_space:
        adapter_token_space(args.init_adapter, "--init-adapter")  # exists and is ours (training compares the two)
    read_checked_examples(args.data, space, args.max_seq_len, args.truncation_side)
