"""The output directory of ``uti-peft train`` (and ``demo --workdir``'s): runs never clobber what they did not write.

Stdlib only, so that the command line checks these rules before importing torch.

A run writes a small marker file (`MARKER_NAME`) into its ``--output-dir`` when it starts; a directory
holding it is "an earlier run of our own". The rules, all checked before the model is loaded:

- a missing or empty directory is used;
- a legacy checkpoint (``trainable_rows.pt``) or an adapter directory without our marker
  (``adapter_config.json``) is never written into, whatever the options;
- any other non-empty directory that is not an earlier run of ours (a user's files) is never written into either:
  ``--overwrite-output-dir`` replaces only an earlier run;
- an earlier run of ours is refused unless ``--overwrite-output-dir`` or ``--resume-from-checkpoint``;
- ``--resume-from-checkpoint latest`` needs an earlier run of ours with a ``checkpoint-<step>`` in it;
  ``--resume-from-checkpoint DIR`` needs DIR to be a checkpoint written by a run of ours (its parent holds our
  marker) and the output directory to be missing, empty or a run of ours.

Overwriting an earlier run of ours removes its ``checkpoint-<step>`` directories (a later ``--resume latest``
must not pick one of them up); every other file is replaced by the new run's or left as it was.
A start that fails before training removes the directory again if it created it.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Optional

MARKER_NAME = ".uti-peft-train.json"
LEGACY_ROWS_NAME = "trainable_rows.pt"
ADAPTER_CONFIG_NAME = "adapter_config.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def is_own_run(directory: str) -> bool:
    """Whether ``directory`` was started by ``uti-peft train`` (holds our marker)."""
    return os.path.isfile(os.path.join(directory, MARKER_NAME))


def checkpoints(directory: str) -> list[str]:
    """The ``checkpoint-<step>`` directories in ``directory``, by step."""
    found = [(int(m.group(1)), name) for name in os.listdir(directory) if (m := CHECKPOINT_PATTERN.match(name))]
    return [os.path.join(directory, name) for _, name in sorted(found) if os.path.isdir(os.path.join(directory, name))]


def _listing(entries: list[str]) -> str:
    shown = ", ".join(sorted(entries)[:5])
    return shown + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")


@dataclass
class OutputPlan:
    """What `check_output_dir` decided: the directory, whether to clear an overwritten run's checkpoints, and
    ``created_root``, the outermost of the directory and its ancestors that did not exist (what a start creates)."""

    directory: str
    clear_checkpoints: bool = False

    def __post_init__(self) -> None:
        root, path = None, os.path.abspath(self.directory)
        while not os.path.exists(path):
            root, path = path, os.path.dirname(path)
        self.created_root = root
        self.was_empty = root is None and not os.listdir(self.directory)

    def claim(self, is_main_process: bool) -> None:
        """Start the run: create the directory and write the marker (main process); clear an overwritten run."""
        if not is_main_process:
            return
        os.makedirs(self.directory, exist_ok=True)
        if self.clear_checkpoints:
            for path in checkpoints(self.directory):
                shutil.rmtree(path)
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with open(os.path.join(self.directory, MARKER_NAME), "w") as f:
            json.dump({"created_by": "uti-peft train", "started_utc": started}, f)
            f.write("\n")

    def abandon(self) -> None:
        """After a failed start: remove the directories this start created, or the marker it wrote into an empty
        directory, if nothing else was written."""
        marker = os.path.join(self.directory, MARKER_NAME)
        if self.was_empty and os.listdir(self.directory) == [MARKER_NAME]:
            os.remove(marker)
        root = self.created_root
        if root is None or not os.path.isdir(root):
            return
        files = [name for _, _, names in os.walk(root) for name in names]
        if set(files) <= {MARKER_NAME}:
            shutil.rmtree(root)


def check_output_dir(
    output_dir: str, overwrite: bool, resume: Optional[str], init_adapter: Optional[str] = None
) -> OutputPlan:
    """Apply the rules of this module (nothing is written); raise `FileExistsError` / `FileNotFoundError`.

    ``init_adapter`` (``--init-adapter``) may not be one of the checkpoints an overwrite would remove.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"--output-dir {output_dir} is a file, not a directory")
    entries = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    own = is_own_run(output_dir)
    if entries and not own:
        if LEGACY_ROWS_NAME in entries:
            raise FileExistsError(
                f"--output-dir {output_dir} is a legacy checkpoint (it holds {LEGACY_ROWS_NAME}); uti-peft train never "
                "writes into one, even with --overwrite-output-dir: choose another directory"
            )
        if ADAPTER_CONFIG_NAME in entries:
            raise FileExistsError(
                f"--output-dir {output_dir} is an adapter directory uti-peft train did not create (it holds "
                f"{ADAPTER_CONFIG_NAME} and no {MARKER_NAME}); it is never written into, even with "
                "--overwrite-output-dir: choose another directory"
            )
    if resume is not None:
        _check_resume(output_dir, resume, entries, own)
        return OutputPlan(output_dir)
    if entries and not own:  # the user's files: no option of ours writes here
        raise FileExistsError(
            f"--output-dir {output_dir} is not empty and not a uti-peft train run (it holds {_listing(entries)} and "
            f"no {MARKER_NAME}); --overwrite-output-dir replaces only an earlier run: choose another directory"
        )
    if entries and not overwrite:
        raise FileExistsError(
            f"--output-dir {output_dir} is not empty (an earlier uti-peft train run; it holds {_listing(entries)}): "
            "pass --resume-from-checkpoint latest to continue it, --overwrite-output-dir to replace it, or choose "
            "another directory"
        )
    plan = OutputPlan(output_dir, clear_checkpoints=own and overwrite)
    if plan.clear_checkpoints and init_adapter:
        source = os.path.realpath(init_adapter)
        for path in checkpoints(output_dir):
            if source == os.path.realpath(path) or source.startswith(os.path.realpath(path) + os.sep):
                raise FileExistsError(
                    f"--init-adapter {init_adapter} is a checkpoint of the run --overwrite-output-dir {output_dir} "
                    "would clear; copy it elsewhere or choose another --output-dir"
                )
    return plan


def _check_resume(output_dir: str, resume: str, entries: list[str], own: bool) -> None:
    if resume == "latest":
        if not own:
            raise FileNotFoundError(
                f"--resume-from-checkpoint latest: --output-dir {output_dir} is not a uti-peft train run "
                f"({'it holds ' + _listing(entries) if entries else 'it is missing or empty'}); nothing of ours to resume"
            )
        if not checkpoints(output_dir):
            raise FileNotFoundError(
                f"--resume-from-checkpoint latest: no checkpoint-<step> directory in {output_dir} (run with --save-steps)"
            )
        return
    parent = os.path.dirname(os.path.abspath(resume))
    if not os.path.isdir(resume) or not os.path.isfile(os.path.join(resume, "trainer_state.json")):
        raise FileNotFoundError(f"--resume-from-checkpoint {resume} is not a checkpoint directory (no trainer_state.json)")
    if not is_own_run(parent):
        raise FileNotFoundError(
            f"--resume-from-checkpoint {resume} was not written by a uti-peft train run (no {MARKER_NAME} in {parent})"
        )
    if entries and not own:
        raise FileExistsError(
            f"--output-dir {output_dir} is not empty and not a uti-peft train run (it holds {_listing(entries)}); "
            "resume into the checkpoint's own run directory or a new one"
        )


def refuse_occupied(directory: str, what: str) -> None:
    """Raise `FileExistsError` if ``directory`` exists and is a file or a non-empty directory: commands that keep
    no marker of their own (``demo --workdir``) write only new or empty directories, never beside old files."""
    if not os.path.lexists(directory):
        return
    if not os.path.isdir(directory) or os.path.islink(directory):
        raise FileExistsError(f"{what} {directory} exists and is not a directory; choose another location")
    entries = os.listdir(directory)
    if entries:
        raise FileExistsError(
            f"{what} {directory} is not empty (it holds {_listing(entries)}); it is never written into: choose "
            "another location, or remove it yourself"
        )


def demo_workdir_targets(workdir: str) -> tuple[str, str]:
    """``workdir/base`` and ``workdir/adapter`` (absolute), refused unless new or empty: ``uti-peft demo`` never
    writes beside other weights or over them."""
    base, adapter = (os.path.abspath(os.path.join(workdir, name)) for name in ("base", "adapter"))
    for target in (base, adapter):
        refuse_occupied(target, f"--workdir {workdir}:")
    return base, adapter
