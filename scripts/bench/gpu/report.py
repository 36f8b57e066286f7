"""A run's state (``Run``, written to OUT after every case) and what is written from it: ``bench_gpu.json``
(medians, ratios, exactness, verdicts) and ``bench_gpu.md``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..params import Paths
from ..probes import dir_bytes, tensor_sha256
from ..report import fmt, median, ratio, rows_bytes_of
from .cases import LOADERS
from .params import JSON_NAME, MD_NAME, OPTIONAL_CASES, GpuParams

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
        "cache (scripts/bench/cases.greedy), after one full-length warm-up generation per model; each clock is read "
        "after the token is read back to the host, which waits for the device.",
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
