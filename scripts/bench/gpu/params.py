"""What a GPU-benchmark run depends on (``GpuParams``, shared by the parent and the case processes), the file
names it writes, and the device helpers every case measures with: synchronised clocks, peak memory, device facts."""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..params import Shape
from ..probes import proc_status, reset_peak_rss


# the entry point the child processes run: scripts/bench_gpu.py, beside this package
ENTRY_POINT = Path(__file__).resolve().parents[2] / "bench_gpu.py"
PARAMS_NAME = "bench_gpu_params.json"
JSON_NAME, MD_NAME = "bench_gpu.json", "bench_gpu.md"
SHARD_SIZE = "4GB"  # Qwen3-8B-Base ships 5 safetensors shards of <= 4 GB
MIN_CASE_S = 10.0  # a case is not started with less budget left than this
OPTIONAL_CASES = {"load-legacy-mean"}  # informational: a timeout there is a lower bound, not a failure


@dataclass(frozen=True)
class GpuParams:
    """Everything a measurement depends on; written to the work dir for the child processes and to the JSON."""

    shape: Shape
    device: str
    reps: int
    load_tokens: int
    prefill_tokens: int
    decode_steps: int
    train_seq_len: int
    train_steps: int
    case_timeout: float
    mean_resizing_timeout: float
    budget: float
    quick: bool
    seed: int = 0
    dtype: str = "bfloat16"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, with the shape's derived sizes added."""
        data = asdict(self)
        data["shape"].update(new_rows=self.shape.new_rows, vocab_size=self.shape.vocab_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GpuParams":
        """Read back ``to_dict``'s output (the derived sizes follow from the shape)."""
        shape = {k: v for k, v in data["shape"].items() if k not in ("new_rows", "vocab_size")}
        return cls(**{**data, "shape": Shape(**shape)})


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA kernels run asynchronously, a clock read without this lies."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device is idle."""
    sync(device)
    return time.perf_counter()


def reset_peak(device: torch.device) -> bool:
    """Reset the peak-memory counter: CUDA's allocator statistics, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return reset_peak_rss()


def memory(device: torch.device) -> dict[str, int]:
    """Memory now and at its peak since `reset_peak`: tensors allocated on a CUDA device, the RSS on the CPU."""
    if device.type == "cuda":
        return {"memory_bytes": torch.cuda.memory_allocated(device),
                "peak_memory_bytes": torch.cuda.max_memory_allocated(device)}
    gc.collect()
    status = proc_status()
    return {"memory_bytes": status["VmRSS"], "peak_memory_bytes": status["VmHWM"]}


def device_facts(device: torch.device) -> dict[str, Any]:
    """What a timing depends on besides the code: the accelerator and its CUDA runtime."""
    if device.type != "cuda":
        return {"name": "cpu"}
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "total_memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count, "cuda_runtime": torch.version.cuda}
