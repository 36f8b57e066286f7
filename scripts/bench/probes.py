"""What the cases measure with: RSS from ``/proc/self/status``, a time limit the kernel enforces, file bytes,
tensor digests and the probe ids. Shared by the case processes (``cases``) and, for sizes, the report."""

from __future__ import annotations

import gc
import hashlib
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch

from .params import Shape

RSS_METHOD = (
    "VmRSS (steady, after gc.collect()) and VmHWM (peak) from /proc/self/status of the case's own process; the "
    "peak is reset with /proc/self/clear_refs=5 after the imports when the kernel allows it (peak_reset=true), so "
    "it covers load + forward only, while both include the ~constant interpreter + imports RSS (rss_after_imports). "
    "safetensors are memory-mapped: resident pages of mapped files count in RSS as RssFile (reported apart from "
    "RssAnon, private memory); pages of a mapping never touched do not count."
)


def proc_status() -> dict[str, int]:
    """Memory fields of /proc/self/status, in bytes."""
    wanted = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def steady_memory() -> dict[str, int]:
    """RSS after a ``gc.collect()`` (total, private, file-backed) and the peak so far, in bytes."""
    gc.collect()
    status = proc_status()
    return {
        "steady_rss_bytes": status["VmRSS"],
        "steady_rss_anon_bytes": status.get("RssAnon", 0),
        "steady_rss_file_bytes": status.get("RssFile", 0),
        "peak_rss_bytes": status["VmHWM"],
    }


def dir_bytes(path: Path) -> int:
    """Total bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tensor_sha256(tensor: torch.Tensor) -> str:
    """A short digest of a tensor's values (as float32): equal logits across cases, equal digests."""
    return hashlib.sha256(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def probe_ids(shape: Shape, length: int, seed: int) -> torch.Tensor:
    """``[1, length]`` ids drawn from the whole token space (text and new rows), the edges first."""
    edges = [0, shape.text_vocab - 1, shape.text_vocab, shape.vocab_size - 1]
    generator = torch.Generator().manual_seed(seed)
    rest = torch.randint(0, shape.vocab_size, (max(length - len(edges), 0),), generator=generator)
    return torch.tensor(edges + rest.tolist())[:length].view(1, -1)


def kill_after(seconds: float) -> None:
    """Have the kernel end this process (SIGALRM, default action) ``seconds`` from now, even inside a long C
    call; 0 disarms. The parent reads the signal as "timed out after exactly that long"."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, seconds)


class ScratchJob:
    """One timed job that writes into a fresh scratch directory: the clock and the peak RSS (reset here) start at
    construction, `stop` reads them, `remove` deletes what the job wrote. The merge, copy-floor and extract cases
    measure alike through it."""

    def __init__(self, out: Path) -> None:
        self.out = out
        shutil.rmtree(out, ignore_errors=True)
        self.rss_before = proc_status()["VmRSS"]
        self.peak_reset = reset_peak_rss()
        self.start = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        """Seconds since construction, peak RSS, RSS when it started (after the imports), whether the peak was reset."""
        seconds = time.perf_counter() - self.start
        return {"seconds": seconds, "peak_rss_bytes": proc_status()["VmHWM"], "rss_after_imports_bytes": self.rss_before,
                "peak_reset": self.peak_reset}

    def remove(self) -> None:
        shutil.rmtree(self.out, ignore_errors=True)
