"""GPU benchmark of uti-peft at full Qwen3-8B shape (36 decoder layers, bf16, random weights), on one device.

``python scripts/bench_gpu.py --out OUT`` (``scripts/bench_gpu.sh OUT`` on a machine without uti-peft installed).
What it measures, each against the reference a user would otherwise run:

1. **Load + first forward** (128 tokens, last-token logits) from the local checkpoints onto the device: ours
   (base + ``PeftModel.from_pretrained``) vs. the merged checkpoint vs. the legacy recipe (base + resize, resize,
   copy rows, ``cases.legacy_patch``; with ``mean_resizing=False``, and once with transformers' default
   mean-resizing, optional and last). Each load in a fresh process, ours and merged alternating, medians of
   ``--reps``; the last-token logits digests must be equal across all of them.
2. **Inference**: prefill (512 tokens) and 32 greedy decode steps with the KV cache, ours vs. merged in one process,
   alternating, after a warm-up; the generated tokens must be the same.
3. **Training step** (batch 1 x 512, AdamW): ours (``is_trainable=True``: the new rows are the only parameters)
   vs. the legacy recipe (whole embedding and lm_head trainable, text-row gradients zeroed): step time, peak
   device memory, gradient + optimizer bytes.

The parent builds the checkpoints on the CPU (``workdir.build_base``: the base has to be written to disk anyway,
so building it on the device would save seconds and leave the parent holding a CUDA context and 16 GB of device
memory while the cases run), preferably in ``/dev/shm`` so that neither the setup nor the loads depend on the
disk's speed. Every case runs in a fresh child process (``--case NAME``, one JSON line on stdout) under a hard
timeout, clipped to what is left of ``--budget``; a failed case is recorded as such and the rest still reported.
``OUT/bench_gpu.json`` and ``OUT/bench_gpu.md`` are rewritten after every case, so a run stopped from outside
leaves what it measured. ``--quick`` runs the same code on a tiny shape with every case in one child process.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from .cases import greedy, import_model_stack, legacy_patch, state_bytes
from .params import DTYPE, QUICK_SHAPE, Paths, Shape
from .probes import dir_bytes, probe_ids, proc_status, reset_peak_rss, tensor_sha256
from .report import fmt, machine_info, median, ratio, rows_bytes_of
from .runner import alternating
from .workdir import build_base, qwen3_config

# the entry point the child processes run: scripts/bench_gpu.py, beside this package
ENTRY_POINT = Path(__file__).resolve().parent.parent / "bench_gpu.py"
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


# ---------------------------------------------------------------------------------------------------- the device


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


class Synced:
    """A model whose every call returns once the device is done: ``cases.greedy`` reads its prefill clock right
    after the prefill forward (and its argmax, one small kernel), which on CUDA would otherwise still be running."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device

    def __call__(self, **kwargs: Any) -> Any:
        out = self.model(**kwargs)
        sync(self.device)
        return out


# ---------------------------------------------------------------------------------------------------- loaders


def load_checkpoint(path: Path, device: str) -> torch.nn.Module:
    """A checkpoint in bf16, straight onto ``device``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE, device_map=device)


def load_ours(paths: Paths, params: GpuParams, trainable: bool = False) -> torch.nn.Module:
    """Base on the device + ``PeftModel.from_pretrained`` (resize + patch the rows, by uti-peft)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_checkpoint(paths.base, params.device), paths.adapter, is_trainable=trainable)


def load_merged(paths: Paths, params: GpuParams) -> torch.nn.Module:
    """The merged checkpoint (``uti_peft.merge_adapter``'s output): what a plain resized model costs."""
    return load_checkpoint(paths.merged, params.device)


def load_legacy(paths: Paths, params: GpuParams, mean_resizing: Optional[bool]) -> torch.nn.Module:
    """The legacy recipe on the device: base, resize, resize, copy the rows of ``trainable_rows.pt``."""
    return legacy_patch(load_checkpoint(paths.base, params.device), paths, params.shape, mean_resizing)


LOADERS: dict[str, Callable[[Paths, GpuParams], torch.nn.Module]] = {
    "ours": load_ours,
    "merged": load_merged,
    "legacy": partial(load_legacy, mean_resizing=False),
    "legacy-mean": partial(load_legacy, mean_resizing=None),  # transformers' default: mean-resizing
}


def legacy_training_model(paths: Paths, params: GpuParams) -> torch.nn.Module:
    """``cases.legacy_training_model``'s recipe, loaded onto the device: the merged model (the legacy-patched
    weights, bit for bit: the load digests check it) with the whole embedding and lm_head trainable, the rest
    frozen, and a hook zeroing the text rows' gradient (into a fresh tensor: hooks must not modify their input)."""
    model = load_merged(paths, params)
    model.requires_grad_(False)
    text_vocab = params.shape.text_vocab

    def zero_text_rows(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:text_vocab] = 0
        return grad

    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        module.weight.requires_grad_(True)
        module.weight.register_hook(zero_text_rows)
    return model


# ---------------------------------------------------------------------------------------------------- cases


def case_load(kind: str, paths: Paths, params: GpuParams) -> dict[str, Any]:
    """Load onto the device and run the first forward (``load_tokens`` ids, last-token logits only), each timed
    with the device synchronised; the CUDA context is created before the clock starts."""
    device = torch.device(params.device)
    ids = probe_ids(params.shape, params.load_tokens, params.seed).to(device)
    peak_reset = reset_peak(device)
    start = clock(device)
    model = LOADERS[kind](paths, params)
    loaded = clock(device)
    with torch.no_grad():
        logits = model(input_ids=ids, logits_to_keep=1).logits
    done = clock(device)
    return {
        "load_s": loaded - start,
        "forward_s": done - loaded,
        "seconds": done - start,
        "peak_reset": peak_reset,
        "logits_width": logits.shape[-1],
        "logits_sha256": tensor_sha256(logits[0, -1].cpu()),
        **memory(device),
    }


def case_inference(paths: Paths, params: GpuParams) -> dict[str, Any]:
    """Ours and merged, both on the device in one process: one warm-up generation each at full length, then
    ``reps`` prefill + greedy decode rounds, the one that goes first swapping each round."""
    device = torch.device(params.device)
    models = {"ours": Synced(load_ours(paths, params), device), "merged": Synced(load_merged(paths, params), device)}
    ids = probe_ids(params.shape, params.prefill_tokens, params.seed + 1).to(device)
    for model in models.values():  # kernels, cuBLAS handles and heuristics, the caching allocator
        greedy(model, ids, 2)
    raw: dict[str, dict[str, list[float]]] = {name: {"prefill_s": [], "decode_s": []} for name in models}
    tokens: dict[str, list[int]] = {}
    for rep in range(params.reps):
        for name in list(models) if rep % 2 == 0 else list(reversed(models)):
            prefill_s, decode_s, tokens[name] = greedy(models[name], ids, params.decode_steps)
            raw[name]["prefill_s"].append(prefill_s)
            raw[name]["decode_s"].append(decode_s)
    return {"raw": raw, "tokens": tokens, "same_tokens": tokens["ours"] == tokens["merged"], **memory(device)}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    """Forward with labels, backward, AdamW step (the gradients stay until the caller zeroes them)."""
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    return float(loss)


def case_train(kind: str, paths: Paths, params: GpuParams) -> dict[str, Any]:
    """A full warm-up step, then ``train_steps`` timed steps on a batch of 1 x ``train_seq_len`` ids. The peak
    memory counter is reset after the load (it covers weights + activations + gradients + AdamW state); the
    gradient and optimizer bytes are read at the last step, before ``zero_grad``."""
    device = torch.device(params.device)
    model = load_ours(paths, params, trainable=True) if kind == "ours" else legacy_training_model(paths, params)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch = probe_ids(params.shape, params.train_seq_len, params.seed + 2).to(device)
    model.train()
    sync(device)
    loaded = memory(device)["memory_bytes"]
    peak_reset = reset_peak(device)
    first_loss = train_step(model, optimizer, batch)
    optimizer.zero_grad(set_to_none=True)
    step_s: list[float] = []
    for _ in range(params.train_steps):
        start = clock(device)
        train_step(model, optimizer, batch)
        step_s.append(clock(device) - start)
        measured = state_bytes(model, optimizer)  # the same at every step
        optimizer.zero_grad(set_to_none=True)
    return {
        "step_s": step_s,
        "first_loss": first_loss,
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_shapes": [list(p.shape) for p in trainable],
        "memory_after_load_bytes": loaded,
        "peak_reset": peak_reset,
        **measured,
        **memory(device),
    }


CASES: dict[str, Callable[[Paths, GpuParams], dict[str, Any]]] = {
    **{f"load-{kind}": partial(case_load, kind) for kind in LOADERS},
    "inference": case_inference,
    "train-ours": partial(case_train, "ours"),
    "train-legacy": partial(case_train, "legacy"),
}


def run_cases_here(names: list[str], workdir: Path) -> int:
    """Child-process entry point: run the cases in order, one JSON line each on stdout."""
    warnings.filterwarnings("ignore")
    paths = Paths(workdir)
    params = GpuParams.from_dict(json.loads((paths.root / PARAMS_NAME).read_text()))
    device = torch.device(params.device)
    import_model_stack()  # peft, transformers, uti_peft (which registers ROW_EXTENSION): outside every clock
    torch.zeros(1, device=device)  # the CUDA context too
    for name in names:
        torch.manual_seed(params.seed)
        result = CASES[name](paths, params)
        print(json.dumps({"case": name, "pid": os.getpid(), "device": device_facts(device), **result}), flush=True)
        gc.collect()
    return 0


# ---------------------------------------------------------------------------------------------------- setup


def base_bytes(shape: Shape) -> int:
    """Bytes of the bf16 base's weights (counted on the meta device: nothing allocated)."""
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(qwen3_config(shape))
    return sum(p.numel() for p in model.parameters()) * DTYPE.itemsize


def available_ram() -> int:
    """``MemAvailable`` from /proc/meminfo, in bytes."""
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024


def temporary_workdir(needed: int) -> Path:
    """A fresh temporary work dir: in /dev/shm (RAM) when it holds ``needed`` bytes with room to spare and the
    memory can afford it twice over, so that neither the setup nor the loads depend on the disk's speed (the
    checkpoints are read from the page cache either way); else under the default temporary directory."""
    shm = Path("/dev/shm")
    roomy = shm.is_dir() and shutil.disk_usage(shm).free > needed * 5 // 4 and available_ram() > 2 * needed
    return Path(tempfile.mkdtemp(prefix="uti-bench-gpu-", dir=shm if roomy else None))


@contextlib.contextmanager
def phase(timings: dict[str, float], name: str) -> Iterator[None]:
    """Time a setup step into ``timings[name]`` and say on stderr how long it took."""
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    print(f"  {name}: {timings[name]:.1f} s", file=sys.stderr, flush=True)


def reusable(paths: Paths, params: GpuParams) -> bool:
    """The work dir holds every checkpoint of a finished setup of the same shape and seed (a given ``--workdir``,
    run again)."""
    if not (paths.root / PARAMS_NAME).is_file():
        return False
    old = GpuParams.from_dict(json.loads((paths.root / PARAMS_NAME).read_text()))
    ready = all(p.exists() for p in (paths.base, paths.adapter, paths.merged, paths.legacy_pt, paths.token_space))
    return ready and old.shape == params.shape and old.seed == params.seed


def prepare(paths: Paths, params: GpuParams) -> dict[str, float]:
    """Build and save, on the CPU: the token space, the base (safetensors shards), the adapter (RowExtensionConfig
    + get_peft_model + save_pretrained), the merged checkpoint (``uti_peft.merge_adapter``, streamed) and the
    legacy ``trainable_rows.pt`` (``uti_peft.export_legacy``). Returns the time of each step."""
    timings: dict[str, float] = {}
    if not reusable(paths, params):
        from peft import get_peft_model
        from transformers.utils import logging as hf_logging

        import uti_peft
        from uti_peft.tiny import build_token_space

        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore")  # deprecations, and merge's "no tokenizer" (the base has none)
        shape = params.shape
        for path in (paths.base, paths.adapter, paths.merged, paths.legacy):
            shutil.rmtree(path, ignore_errors=True)
        paths.root.mkdir(parents=True, exist_ok=True)
        space = build_token_space(shape.text_vocab, special_size=shape.special, image_size=shape.image,
                                  n_codebooks=shape.codebooks, codebook_size=shape.codebook_size)
        assert space.vocab_size == shape.vocab_size, (space.vocab_size, shape.vocab_size)
        space.save(str(paths.token_space))
        with phase(timings, "build_base_s"):
            base = build_base(shape, params.seed)
        with phase(timings, "save_base_s"):
            base.save_pretrained(paths.base, max_shard_size=SHARD_SIZE)
        base.name_or_path = str(paths.base)  # what PEFT records as the adapter's base_model_name_or_path
        config = uti_peft.RowExtensionConfig(token_space=space, base_model_name_or_path=str(paths.base))
        with phase(timings, "get_peft_model_s"):  # includes the from-scratch row init (text-row statistics)
            model = get_peft_model(base, config)
        with phase(timings, "save_adapter_s"):
            model.save_pretrained(paths.adapter)
        del model, base
        gc.collect()
        with phase(timings, "merge_adapter_s"):
            uti_peft.merge_adapter(paths.base, paths.adapter, paths.merged, progress=False)
        with phase(timings, "export_legacy_s"):
            uti_peft.export_legacy(paths.adapter, paths.legacy, progress=False)
    (paths.root / PARAMS_NAME).write_text(json.dumps(params.to_dict(), indent=1))
    return timings


# ---------------------------------------------------------------------------------------------------- the parent


def spawn(names: list[str], workdir: Path, timeout: float) -> list[dict[str, Any]]:
    """Run cases in one fresh ``python scripts/bench_gpu.py --case ...`` process, killed after ``timeout``
    seconds; a case that did not report comes back as ``{"failed": why, "timed_out": bool}``."""
    cmd = [sys.executable, str(ENTRY_POINT), "--workdir", str(workdir)]
    for name in names:
        cmd += ["--case", name]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        stdout, timed_out = proc.stdout, False
        why = None if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        timed_out, why = True, f"killed after its {timeout:.0f} s limit"
    wall = time.perf_counter() - start
    reported = {data["case"]: data for data in map(json.loads, filter(lambda line: line.startswith("{"),
                                                                       stdout.splitlines()))}
    results = [{**reported[name], "process_wall_s": wall} if name in reported else
               {"case": name, "failed": why or "no result", "timed_out": timed_out, "process_wall_s": wall}
               for name in names]
    failed = [r["case"] for r in results if "failed" in r]
    last_line = (why or "no result").strip().splitlines()[-1]
    print(f"  {' + '.join(names)}: {wall:.1f} s" + (f"  FAILED {failed}: {last_line}" if failed else ""),
          file=sys.stderr, flush=True)
    return results


def schedule(params: GpuParams) -> list[tuple[list[str], float]]:
    """The plan as (cases of one process, its timeout): every measurement once first (ours and merged loads, the
    legacy load, inference, training), then the other load repetitions (ours and merged alternating which goes
    first), and last the optional mean-resizing legacy load; so that a budget that runs short still leaves one of
    each. ``--quick`` runs them all in one process (the interpreter + import start-up would dominate)."""
    loads = alternating(["load-ours", "load-merged"], params.reps, params.case_timeout)
    once = [(name, params.case_timeout) for name in ("load-legacy", "inference", "train-ours", "train-legacy")]
    steps = loads[:2] + once + loads[2:] + [("load-legacy-mean", params.mean_resizing_timeout)]
    if params.quick:
        return [([name for name, _ in steps], sum(timeout for _, timeout in steps))]
    return [([name], timeout) for name, timeout in steps]


@dataclass
class Run:
    """A run's state: what is written to OUT after every step."""

    params: GpuParams
    out: Path
    workdir: Path
    machine: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)
    setup_s: dict[str, float] = field(default_factory=dict)
    setup_error: Optional[str] = None
    raw: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    complete: bool = False

    def add(self, results: list[dict[str, Any]]) -> None:
        """Append each case's result to its list (repetitions in order), take the device facts, write OUT."""
        for result in results:
            self.raw.setdefault(result["case"], []).append(result)
            if "device" in result:
                self.machine["device"] = result["device"]
        self.write()

    def values(self, case: str, key: str) -> list[Any]:
        """The ``key`` of every repetition of ``case`` that has it (failed repetitions have not)."""
        return [r[key] for r in self.raw.get(case, []) if key in r]

    def first(self, case: str) -> dict[str, Any]:
        """The first successful result of ``case`` (empty when none)."""
        return next((r for r in self.raw.get(case, []) if "failed" not in r), {})

    def failures(self) -> list[dict[str, Any]]:
        """Every failed or skipped case repetition."""
        return [r for results in self.raw.values() for r in results if "failed" in r]

    def write(self) -> dict[str, Any]:
        """Write bench_gpu.json and bench_gpu.md as they stand; returns the report."""
        report = build_report(self)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / JSON_NAME).write_text(json.dumps(report, indent=1, default=str))
        (self.out / MD_NAME).write_text(markdown(report))
        return report


def run_schedule(run: Run) -> None:
    """Run every step in fresh processes, each timeout clipped to what is left of the budget; a step that
    cannot have ``MIN_CASE_S`` is recorded as skipped."""
    deadline = run.started + run.params.budget
    for names, timeout in schedule(run.params):
        left = deadline - time.perf_counter()
        if left < MIN_CASE_S and not run.params.quick:
            run.add([{"case": name, "failed": f"skipped: {left:.0f} s of the budget left", "timed_out": False}
                     for name in names])
            continue
        run.add(spawn(names, run.workdir, timeout if run.params.quick else min(timeout, left)))


# ---------------------------------------------------------------------------------------------------- the report


def load_medians(run: Run) -> dict[str, dict[str, Optional[float]]]:
    """Per load kind: medians of the repetitions' seconds, load, forward and memory."""
    keys = ("seconds", "load_s", "forward_s", "memory_bytes", "peak_memory_bytes")
    return {kind: {key: median(run.values(f"load-{kind}", key)) for key in keys} for kind in LOADERS}


def inference_medians(run: Run) -> dict[str, dict[str, Optional[float]]]:
    """Per model: medians of the prefill and decode rounds."""
    raw = run.first("inference").get("raw", {})
    return {name: {key: median(raw.get(name, {}).get(key, [])) for key in ("prefill_s", "decode_s")}
            for name in ("ours", "merged")}


def training_medians(run: Run) -> dict[str, dict[str, Any]]:
    """Per recipe: median step time, peak memory, gradient + optimizer bytes, trainable parameters."""
    out = {}
    for kind in ("ours", "legacy"):
        result = run.first(f"train-{kind}")
        out[kind] = {"step_s": median(result.get("step_s", []))}
        for key in ("peak_memory_bytes", "memory_after_load_bytes", "state_bytes", "grad_bytes",
                    "optimizer_tensor_bytes", "optimizer_scalar_bytes", "trainable_params", "first_loss"):
            out[kind][key] = result.get(key)
    return out


def exactness(run: Run) -> dict[str, Any]:
    """The facts that must hold whatever the timings: one logits digest across every load that reported (ours,
    merged, legacy, and legacy with mean-resizing when it finished), the same greedy tokens; and, reported only,
    the same loss at the first training step and ours' state = 3 x the rows (gradient + 2 AdamW moments)."""
    digests = {kind: sorted(set(run.values(f"load-{kind}", "logits_sha256"))) for kind in LOADERS}
    required = all(digests[kind] for kind in ("ours", "merged", "legacy"))
    inference = run.first("inference")
    ours, legacy = run.first("train-ours"), run.first("train-legacy")
    rows = rows_bytes_of(run.params.shape)
    return {
        "logits_sha256": digests,
        "logits_identical": len({d for ds in digests.values() for d in ds}) == 1 if required else None,
        "same_tokens": inference.get("same_tokens"),
        "same_first_training_loss": ours["first_loss"] == legacy["first_loss"] if ours and legacy else None,
        "rows_bytes": rows,
        "ours_state_is_3x_rows_plus_step_scalars": (
            ours["state_bytes"] == 3 * rows + ours["optimizer_scalar_bytes"] if ours else None),
    }


def comparisons(run: Run, load: dict, infer: dict, train: dict) -> list[dict[str, Any]]:
    """The measured rows: key (in bench_gpu.json's ``ratios``), measurement, ours, reference, ratio (ours /
    reference), unit."""
    p = run.params
    memory_name = "GPU memory (max allocated)" if p.device.startswith("cuda") else "RSS"
    loads = f"load + first forward ({p.load_tokens} tokens)"
    rows = [
        ("load_ours_over_merged", f"{loads}: ours vs merged checkpoint", load, "merged", "seconds", "s"),
        ("load_ours_over_legacy", f"{loads}: ours vs legacy recipe (mean_resizing=False)", load, "legacy",
         "seconds", "s"),
        ("load_ours_over_legacy_mean_resizing",
         f"{loads}: ours vs legacy recipe (transformers defaults: mean-resizing)", load, "legacy-mean", "seconds", "s"),
        ("load_peak_memory_ours_over_merged", f"peak {memory_name}, {loads}: ours vs merged", load, "merged",
         "peak_memory_bytes", "bytes"),
        ("prefill_ours_over_merged", f"prefill {p.prefill_tokens} tokens: ours vs merged", infer, "merged",
         "prefill_s", "s"),
        ("decode_ours_over_merged", f"decode {p.decode_steps} greedy steps (KV cache): ours vs merged", infer,
         "merged", "decode_s", "s"),
        ("train_step_ours_over_legacy", f"training step (batch 1 x {p.train_seq_len}, AdamW): ours vs legacy recipe",
         train, "legacy", "step_s", "s"),
        ("train_peak_memory_ours_over_legacy", f"peak {memory_name}, training step: ours vs legacy recipe", train,
         "legacy", "peak_memory_bytes", "bytes"),
        ("train_state_ours_over_legacy", "gradient + optimizer state: ours vs legacy recipe", train, "legacy",
         "state_bytes", "bytes"),
    ]
    return [{"key": key, "measurement": name, "ours": group["ours"][value], "reference": group[reference][value],
             "ratio": ratio(group["ours"][value], group[reference][value]), "unit": unit}
            for key, name, group, reference, value, unit in rows]


def verdicts(run: Run, exact: dict[str, Any]) -> list[dict[str, Any]]:
    """The exactness rows of the table: the digests, and whether they (and the greedy tokens) agree."""
    digests = exact["logits_sha256"]
    tokens = {name: tensor_sha256(torch.tensor(ids)) for name, ids in run.first("inference").get("tokens", {}).items()}
    word = {True: "identical", False: "**DIFFERENT**", None: None}
    return [
        {"measurement": "last-token logits sha256: ours vs merged, legacy", "ours": ",".join(digests["ours"]) or None,
         "reference": ", ".join(",".join(digests[k]) for k in ("merged", "legacy", "legacy-mean") if digests[k])
         or None, "ratio": word[exact["logits_identical"]], "unit": ""},
        {"measurement": f"greedy tokens sha256 ({run.params.decode_steps} steps): ours vs merged",
         "ours": tokens.get("ours"), "reference": tokens.get("merged"), "ratio": word[exact["same_tokens"]], "unit": ""},
    ]


def notes(params: GpuParams) -> list[str]:
    """How each measurement was taken (also in bench_gpu.md)."""
    return [
        "Every load runs in a fresh process (ours and merged alternating which goes first), from checkpoints in "
        "the page cache (or /dev/shm); the CUDA context is created before the clock starts, and the device is "
        "synchronised before each clock read.",
        "Legacy recipe: base + resize_token_embeddings(text) + resize_token_embeddings(total) + copy the rows of "
        "trainable_rows.pt (scripts/bench/cases.legacy_patch), on the device. The mean-resizing run (transformers' "
        "default) is optional and last; a timeout there is reported, not a failure.",
        "Inference: prefill (last-token logits only, as generate() does), then greedy decode steps with the KV "
        "cache (scripts/bench/cases.greedy), after one full-length warm-up generation per model; the model call "
        "synchronises the device, so the prefill time excludes only the argmax kernel, counted in decode.",
        "Training: ours = PeftModel.from_pretrained(base, adapter, is_trainable=True); legacy = the merged model "
        "(bit-identical to the legacy-patched one) with the whole embedding and lm_head trainable and a hook "
        "zeroing the text rows' gradient. AdamW (lr 1e-4), one full warm-up step, then "
        f"{params.train_steps} timed step(s); peak memory is reset after the load.",
        "Peak memory: torch.cuda.max_memory_allocated on CUDA (tensors only, not the allocator's cache or the "
        "context); VmHWM (peak RSS) of the case's process on the CPU.",
    ]


def build_report(run: Run) -> dict[str, Any]:
    """bench_gpu.json: machine, parameters, setup, medians, ratios, exactness, the table, raw repetitions."""
    load, infer, train = load_medians(run), inference_medians(run), training_medians(run)
    exact = exactness(run)
    measured = comparisons(run, load, infer, train)
    failures = run.failures()
    paths = Paths(run.workdir)
    checkpoints = {"base": paths.base, "merged": paths.merged, "adapter": paths.adapter}
    return {
        "complete": run.complete,
        "ok": run_ok(run, exact, failures),
        "machine": run.machine,
        "parameters": run.params.to_dict(),
        "workdir": {"path": str(run.workdir), "in_ram": str(run.workdir).startswith("/dev/shm")},
        "setup_s": run.setup_s,
        "setup_error": run.setup_error,
        "checkpoint_bytes": {name: dir_bytes(path) for name, path in checkpoints.items() if path.is_dir()},
        "medians": {"load": load, "inference": infer, "training": train},
        "ratios": {row["key"]: row["ratio"] for row in measured},
        "exactness": exact,
        "failures": [{k: r[k] for k in ("case", "failed", "timed_out") if k in r} for r in failures],
        "table": measured + verdicts(run, exact),
        "notes": notes(run.params),
        "raw": run.raw,
        "bench_wall_s": time.perf_counter() - run.started,
    }


def run_ok(run: Run, exact: dict[str, Any], failures: list[dict[str, Any]]) -> bool:
    """True when the setup ran, no required case failed and no exactness fact is false."""
    required_failed = [r for r in failures if r["case"] not in OPTIONAL_CASES]
    facts = (exact["logits_identical"], exact["same_tokens"])
    return run.setup_error is None and not required_failed and False not in facts


def cell(value: Any, unit: str) -> str:
    """One table cell: ``report.fmt`` for values, 3 decimals for ratios."""
    return f"{value:.3f}" if isinstance(value, float) and not unit else fmt(value, unit)


def markdown(report: dict[str, Any]) -> str:
    """bench_gpu.md: the machine and shape in two sentences, the table, failures, setup times, notes."""
    p, s, m = report["parameters"], report["parameters"]["shape"], report["machine"]
    device = m.get("device", {})
    lines = [
        "# uti-peft GPU benchmark" + (" (--quick: tiny shape, timings meaningless)" if p["quick"] else ""),
        "",
        f"{device.get('name', p['device'])}"
        + (f" (CUDA {device['cuda_runtime']})" if "cuda_runtime" in device else "")
        + f", {m['cpu_model']}, {m['cores_usable']} cores; torch {m['torch']}, transformers {m['transformers']}, "
        f"peft {m['peft']}.",
        "",
        f"Qwen3, {s['layers']} decoder layers (hidden {s['hidden']}, intermediate {s['intermediate']}, "
        f"{s['heads']}/{s['kv_heads']} heads, head_dim {s['head_dim']}), base rows {s['vocab_rows']:,}, text "
        f"{s['text_vocab']:,} + new {s['new_rows']:,} = {s['vocab_size']:,} rows, {p['dtype']}, random weights, on "
        f"{p['device']}. Medians of {p['reps']} repetition(s).",
        "",
        "| measurement | uti-peft | reference | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for row in report["table"]:
        lines.append(f"| {row['measurement']} | {cell(row['ours'], row['unit'])} | "
                     f"{cell(row['reference'], row['unit'])} | {cell(row['ratio'], '')} |")
    lines.append("")
    if report["setup_error"]:
        lines += [f"**Setup failed**: {report['setup_error'].strip().splitlines()[-1]}", ""]
    lines += [f"- **Failed**: {f['case']}: {f['failed'].strip().splitlines()[-1]}" for f in report["failures"]]
    setup = ", ".join(f"{k} {v:.1f}" for k, v in report["setup_s"].items())
    lines += ["", f"Setup (s): {setup or 'reused'}. Total: {report['bench_wall_s']:.0f} s"
              + ("." if report["complete"] else " (incomplete)."), "", "Notes:", ""]
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- command line


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The flags of ``scripts/bench_gpu.py`` (the hidden ``--case`` is how the parent starts a case process)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where bench_gpu.json/.md go")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the checkpoints go (~34 GB at full shape) and are kept (a second run with the "
                             "same shape reuses them); default: a temporary directory, in /dev/shm when it has room, "
                             "removed at the end")
    parser.add_argument("--device", default="cuda", help="torch device of the measurements")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (a fresh process each for the loads)")
    parser.add_argument("--layers", type=int, default=36, help="Qwen3-8B-shaped decoder layers")
    parser.add_argument("--load-tokens", type=int, default=128, help="tokens of the first forward after a load")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the inference case")
    parser.add_argument("--decode-steps", type=int, default=32, help="greedy decode steps after the prefill")
    parser.add_argument("--train-seq-len", type=int, default=512, help="sequence length of the training step")
    parser.add_argument("--train-steps", type=int, default=3, help="timed training steps (after a warm-up step)")
    parser.add_argument("--case-timeout", type=float, default=120.0, help="seconds allowed to each case process")
    parser.add_argument("--mean-resizing-timeout", type=float, default=60.0,
                        help="seconds allowed to the (optional, last) legacy load with transformers' mean-resizing")
    parser.add_argument("--budget", type=float, default=285.0,
                        help="seconds for the whole run: each case's timeout is clipped to what is left")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the rows and the token ids")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shape (uti_peft.tiny sizes), 1 repetition, short sequences, every case in one "
                             "child process: the same code paths in seconds, for tests (with --device cpu)")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def params_from_args(args: argparse.Namespace) -> GpuParams:
    """The run's parameters: the flags at Qwen3-8B shape, or ``--quick``'s fixed tiny run."""
    common = dict(device=args.device, case_timeout=args.case_timeout,
                  mean_resizing_timeout=args.mean_resizing_timeout, budget=args.budget, seed=args.seed)
    if args.quick:
        return GpuParams(shape=QUICK_SHAPE, reps=1, load_tokens=8, prefill_tokens=16, decode_steps=4,
                         train_seq_len=16, train_steps=1, quick=True, **common)
    return GpuParams(shape=replace(Shape(), layers=args.layers), reps=args.reps, load_tokens=args.load_tokens,
                     prefill_tokens=args.prefill_tokens, decode_steps=args.decode_steps,
                     train_seq_len=args.train_seq_len, train_steps=args.train_steps, quick=False, **common)


def main(argv: Optional[list[str]] = None) -> int:
    """Run case processes (``--case``), or the whole benchmark: check the device, set up the work dir, run the
    schedule, write OUT after each step. Exit 0 when every required case ran and the exactness facts hold, 1
    otherwise (OUT still holds what was measured), 2 when the device is not there."""
    args = parse_args(argv)
    if args.case:
        return run_cases_here(args.case, args.workdir)
    params = params_from_args(args)
    if params.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench_gpu: error: --device {params.device} but torch {torch.__version__} sees no CUDA device "
              "(use --device cpu for a --quick check)", file=sys.stderr)
        return 2
    import uti_peft

    machine = {**machine_info(), "cuda_build": torch.version.cuda, "uti_peft": uti_peft.__version__,
               "uti_peft_path": os.path.dirname(uti_peft.__file__)}
    print(f"torch {machine['torch']} (CUDA {machine['cuda_build']}), transformers {machine['transformers']}, "
          f"peft {machine['peft']}", file=sys.stderr, flush=True)
    needed = 2 * base_bytes(params.shape) + 3 * rows_bytes_of(params.shape)  # base, merged, adapter, legacy
    workdir = args.workdir.resolve() if args.workdir else temporary_workdir(needed)
    run = Run(params, args.out, workdir, machine)
    try:
        print(f"setup in {workdir}", file=sys.stderr, flush=True)
        try:
            run.setup_s = prepare(Paths(workdir), params)
        except Exception:
            run.setup_error = traceback.format_exc()
            print(run.setup_error, file=sys.stderr)
        run.write()
        if run.setup_error is None:
            run_schedule(run)
        run.complete = True
        report = run.write()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(report))
    return 0 if report["ok"] else 1
