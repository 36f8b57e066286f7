"""From the runner's raw results to ``bench.json`` (machine, parameters, one section per measured group, raw
repetitions, the table of targets and informational rows) and ``bench.md`` (the same table, formatted).

The thresholds of the targets live here, next to the rows that check them."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Optional

import torch

from .params import DTYPE_BYTES, MB, PEERS, Params, Paths, Shape
from .probes import RSS_METHOD, dir_bytes
from .runner import Runner


def median(values: list[float]) -> Optional[float]:
    """The median, or None when a case gave no value (failed or timed out)."""
    return statistics.median(values) if values else None


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    """``num / den``, or None when either side is missing (or the denominator is 0)."""
    return None if num is None or not den else num / den


def target(name: str, ours: Any, reference: Any, value: Optional[float], limit: str, met: Optional[bool],
           unit: str = "") -> dict[str, Any]:
    """A table row with a threshold: ``met`` says whether ours meets it (None: not measured)."""
    return {"measurement": name, "kind": "target", "ours": ours, "reference": reference, "ratio": value,
            "target": limit, "met": met, "unit": unit}


def info(name: str, ours: Any, reference: Any, value: Optional[float], unit: str = "", note: str = "") -> dict:
    """A table row without a threshold: reported for comparison, never counted as met or missed."""
    return {"measurement": name, "kind": "info", "ours": ours, "reference": reference, "ratio": value,
            "target": note or "info", "met": None, "unit": unit}


def ratio_target(name: str, ours: Optional[float], reference: Optional[float], limit: str, unit: str) -> dict:
    """A target on the ratio ours / reference; ``limit`` is the bound as the table shows it (``"<= 1.10"``), and
    the bound checked is read from that text, so that the two cannot disagree."""
    value, bound = ratio(ours, reference), float(limit.removeprefix("<= "))
    return target(name, ours, reference, value, limit, None if value is None else value <= bound, unit)


def head_matrix_bytes(shape: Shape) -> int:
    """Bytes of one extended embedding or lm_head matrix (vocab_size x hidden, bf16)."""
    return shape.vocab_size * shape.hidden * DTYPE_BYTES


def rows_bytes_of(shape: Shape) -> int:
    """Bytes of the adapter's new rows: new_rows x hidden, bf16, in the embedding and in the untied lm_head."""
    return 2 * shape.new_rows * shape.hidden * DTYPE_BYTES


LOAD_KEYS = ("seconds", "load_s", "forward_s", "steady_rss_bytes", "peak_rss_bytes", "steady_rss_anon_bytes",
             "steady_rss_file_bytes", "rss_after_imports_bytes")


def load_medians(runner: Runner, case: str) -> dict[str, Any]:
    """Medians of a load case's repetitions: its LOAD_KEYS, each load phase, and each forward after the load."""
    results = [r for r in runner.results.get(case, []) if "seconds" in r]
    med: dict[str, Any] = {key: median(runner.values(case, key)) for key in LOAD_KEYS}
    phases = sorted({name for r in results for name in r.get("phases", {})})
    med["phases"] = {name: median([r["phases"][name] for r in results if name in r["phases"]]) for name in phases}
    count = min((len(r["forwards_s"]) for r in results), default=0)
    med["forwards_s"] = [median([r["forwards_s"][i] for r in results]) for i in range(count)]
    return med


def depth_fit(sweep: dict[int, dict[str, Any]], kind: str) -> Optional[dict[str, float]]:
    """Least-squares ``seconds = fixed + per_layer * layers`` over the sweep's depths (None under 2 depths)."""
    points = [(n, d[kind]["seconds"]) for n, d in sweep.items() if d[kind]["seconds"] is not None]
    if len(points) < 2:
        return None
    mean_n = sum(n for n, _ in points) / len(points)
    mean_s = sum(t for _, t in points) / len(points)
    per_layer = sum((n - mean_n) * (t - mean_s) for n, t in points) / sum((n - mean_n) ** 2 for n, _ in points)
    return {"fixed_s": mean_s - per_layer * mean_n, "per_layer_s": per_layer}


def load_section(runner: Runner, params: Params) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """bench.json's ``load`` section and its rows: per sweep depth the medians of ours and merged (ratio, ours'
    fixed cost over merged, phases, forwards after the load), the fits of time against depth, the legacy loads at
    the main depth, and whether each depth's loads gave the same logits."""
    main = params.shape.layers
    sweep = {n: {kind: load_medians(runner, f"load-{kind}-{n}L") for kind in ("ours", "merged")}
             for n in params.depths}
    for n, data in sweep.items():
        ours, merged = data["ours"]["seconds"], data["merged"]["seconds"]
        data["ratio"] = ratio(ours, merged)
        data["ours_minus_merged_s"] = None if ours is None or merged is None else ours - merged
        # robust to the first forward's run-to-run noise: repetition i of ours against repetition i of merged (run
        # back to back), and the load alone, without the forward
        pairs = zip(runner.values(f"load-ours-{n}L", "seconds"), runner.values(f"load-merged-{n}L", "seconds"))
        data["paired_ratio"] = median([o / m for o, m in pairs])
        load_ours, load_merged = data["ours"]["load_s"], data["merged"]["load_s"]
        data["load_only_ours_minus_merged_s"] = (None if load_ours is None or load_merged is None
                                                 else load_ours - load_merged)
    med = {**sweep[main], "legacy_nomean": load_medians(runner, "load-legacy-nomean")}
    legacy = dict(runner.first("load-legacy"))
    if legacy.get("timed_out"):  # stopped by kill_after(): the load ran for exactly legacy_timeout seconds
        legacy["seconds_lower_bound"] = params.legacy_timeout

    def digests(case: str) -> set:
        return {r["logits_sha256"] for r in runner.results.get(case, []) if r.get("logits_sha256")}

    same = {n: digests(f"load-ours-{n}L") | digests(f"load-merged-{n}L") for n in params.depths}
    legacy_digests = digests("load-legacy-nomean") | digests("load-legacy")
    head_bytes = head_matrix_bytes(params.shape)
    section = {
        "medians": med,
        "sweep": {str(n): data for n, data in sweep.items()},
        "fit_merged": depth_fit(sweep, "merged"),
        "fit_ours": depth_fit(sweep, "ours"),
        "legacy_defaults": legacy,
        "head_matrix_bytes": head_bytes,
        "rss_method": RSS_METHOD,
        "last_token_logits_sha256": {str(n): sorted(d) for n, d in same.items()} | {"legacy": sorted(legacy_digests)},
        "logits_identical_ours_merged_legacy": all(len(d) == 1 for d in same.values()) and legacy_digests <= same[main],
    }
    return section, sweep_rows(sweep, params) + load_rows(med, legacy, head_bytes)


def sweep_rows(sweep: dict[int, dict[str, Any]], params: Params) -> list[dict[str, Any]]:
    """Per depth: load + first forward, ours vs merged (a target at the shallowest depth, the head-dominated worst
    case, and at the deepest; the others informational) and ours' fixed cost over merged; then the load phases at
    the shallowest depth and the forwards after the load at the deepest."""
    rows, depths = [], sorted(sweep)
    for n in depths:
        ours, merged = sweep[n]["ours"]["seconds"], sweep[n]["merged"]["seconds"]
        label = f"load + first {params.load_probe_tokens}-token forward, {n} layer(s) (s): ours vs merged"
        if n in (depths[0], depths[-1]):
            rows.append(ratio_target(label, ours, merged, "<= 1.10" if n == depths[0] else "<= 1.03", "s"))
        else:
            rows.append(info(label, ours, merged, ratio(ours, merged), "s"))
        rows.append(info(f"  per-repetition ratios, {n} layer(s): median", "–", "–", sweep[n]["paired_ratio"], "",
                         "info: each repetition of ours over the merged one run beside it"))
        rows.append(info(f"  ours - merged, {n} layer(s) (s)", sweep[n]["ours_minus_merged_s"], None, None, "s",
                         "info: the fixed cost of ours"))
        rows.append(info(f"  ours - merged, load alone (no forward), {n} layer(s) (s)",
                         sweep[n]["load_only_ours_minus_merged_s"], None, None, "s",
                         "info: the fixed cost without the first forward's noise"))
    first, last = sweep[depths[0]], sweep[depths[-1]]
    o_phases, m_phases = first["ours"]["phases"], first["merged"]["phases"]
    for key, label in (("base_s", "base checkpoint load (merged: the merged checkpoint)"),
                       ("from_pretrained_s", "PeftModel.from_pretrained (rows, checks, injection)"),
                       ("head_build_s", "  of which the extended head's build"),
                       ("peft_load_rows_s", "  of which PEFT's load of the saved rows")):
        o, m = o_phases.get(key), m_phases.get(key)
        rows.append(info(f"phase, {depths[0]} layer(s): {label} (s)", o, m, ratio(o, m), "s"))
    o, m = first["ours"]["forward_s"], first["merged"]["forward_s"]
    rows.append(info(f"phase, {depths[0]} layer(s): first forward (s)", o, m, ratio(o, m), "s"))
    for i, (o, m) in enumerate(zip(last["ours"]["forwards_s"], last["merged"]["forwards_s"])):
        rows.append(info(f"forward {i + 1} after the load, {depths[-1]} layer(s) (s)", o, m, ratio(o, m), "s"))
    return rows


def head_build_section(runner: Runner) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """bench.json's ``head_build`` section and its rows: building the extended head by mapping the base file (ours),
    by the copy fallback and by a plain torch copy, in seconds and GB/s of text rows, and the resident copy speed."""
    keys = ("build_s", "read_s", "build_gb_per_s", "resident_copy_gb_per_s")
    med = {kind: {key: median(runner.values(f"head-{kind}", key)) for key in keys} for kind in ("map", "copy", "plain")}
    mapped, copied, plain = med["map"], med["copy"], med["plain"]
    rows = [
        info("extended head build: mapping the base file (ours) vs a plain torch copy (s)", mapped["build_s"],
             plain["build_s"], ratio(mapped["build_s"], plain["build_s"]), "s"),
        info("  then the first read of its text rows (s): mapping vs plain copy", mapped["read_s"], plain["read_s"],
             ratio(mapped["read_s"], plain["read_s"]), "s"),
        info("extended head build, copy fallback vs plain torch copy (GB/s of text rows)", copied["build_gb_per_s"],
             plain["build_gb_per_s"], ratio(copied["build_gb_per_s"], plain["build_gb_per_s"]), "GB/s"),
        info("  the same copy between resident buffers (memory speed, GB/s)", plain["resident_copy_gb_per_s"], None,
             None, "GB/s"),
    ]
    return {"medians": med, "raw": {kind: runner.results.get(f"head-{kind}", []) for kind in med}}, rows


def switch_section(runner: Runner) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """bench.json's ``switch`` section and its row: ``set_adapter`` between two row adapters vs a copy of the rows."""
    result = runner.first("switch")
    row = ratio_target("set_adapter switch between two row adapters (s): vs a plain copy of the rows",
                       result.get("switch_s"), result.get("copy_s"), "<= 1.1", "s")
    return result, [row]


def head_loss_section(runner: Runner) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """bench.json's ``head_loss`` section and its rows: TRL's fused log-prob head vs our unfused head + loss, one
    training step on a long sequence, time and peak memory (information: which wins depends on the length)."""
    keys = ("seconds", "peak_rss_above_setup_bytes")
    med = {kind: {key: median(runner.values(f"head-loss-{kind}", key)) for key in keys} for kind in ("fused", "unfused")}
    fused, unfused = med["fused"], med["unfused"]
    tokens = runner.first("head-loss-fused").get("tokens")
    rows = [
        info(f"lm_head + loss step, {tokens} tokens (s): TRL's fused head vs ours unfused", fused["seconds"],
             unfused["seconds"], ratio(fused["seconds"], unfused["seconds"]), "s"),
        info("  its peak memory above the set-up (bytes): fused vs unfused", fused["peak_rss_above_setup_bytes"],
             unfused["peak_rss_above_setup_bytes"],
             ratio(fused["peak_rss_above_setup_bytes"], unfused["peak_rss_above_setup_bytes"]), "bytes"),
    ]
    return {"medians": med, "raw": {kind: runner.results.get(f"head-loss-{kind}", []) for kind in med}}, rows


def load_rows(med: dict[str, dict[str, Any]], legacy: dict[str, Any], head_bytes: int) -> list[dict[str, Any]]:
    """The load table rows: time and memory of ours vs merged (targets) and vs the legacy loader (info)."""
    o, m, nomean = med["ours"], med["merged"], med["legacy_nomean"]
    legacy_s, legacy_bound = legacy.get("seconds"), legacy.get("seconds_lower_bound")
    rows = []
    label = "load + forward time: legacy (transformers defaults: mean_resizing) vs ours"
    if legacy_s is not None:
        rows.append(info(label, legacy_s, o["seconds"], ratio(legacy_s, o["seconds"]), "s", "info (legacy/ours)"))
    elif legacy_bound is not None:
        rows.append(info(label, f">= {legacy_bound:g} s (timed out)", o["seconds"], ratio(legacy_bound, o["seconds"]),
                         "s", "info: legacy/ours is at least this"))
    else:
        rows.append(info(label, "n/a (failed, see load.legacy_defaults)", o["seconds"], None, "s"))
    rows.append(info("load + forward time: legacy (mean_resizing=False) vs ours", nomean["seconds"],
                     o["seconds"], ratio(nomean["seconds"], o["seconds"]), "s", "info (legacy/ours)"))
    rows.append(ratio_target("steady RSS after load + forward: ours vs merged", o["steady_rss_bytes"],
                             m["steady_rss_bytes"], "<= 1.10", "bytes"))
    for part, key in (("private (RssAnon)", "steady_rss_anon_bytes"),
                      ("file-backed (RssFile)", "steady_rss_file_bytes")):
        rows.append(info(f"  of which {part}: ours vs merged", o[key], m[key], ratio(o[key], m[key]), "bytes"))
    limit = None if m["peak_rss_bytes"] is None else m["peak_rss_bytes"] + head_bytes
    met = None if limit is None or o["peak_rss_bytes"] is None else o["peak_rss_bytes"] <= limit
    rows.append(target("peak RSS during load + forward: ours vs merged", o["peak_rss_bytes"], m["peak_rss_bytes"],
                       ratio(o["peak_rss_bytes"], m["peak_rss_bytes"]),
                       f"ours <= merged + one head matrix ({head_bytes:,} B)", met, "bytes"))
    rows.append(info("peak RSS: legacy (mean_resizing=False) vs ours", nomean["peak_rss_bytes"],
                     o["peak_rss_bytes"], ratio(nomean["peak_rss_bytes"], o["peak_rss_bytes"]), "bytes",
                     "info (legacy/ours)"))
    return rows


def inference_section(runner: Runner, params: Params) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """bench.json's ``inference`` section and its rows: prefill and decode medians, ours vs merged."""
    result = runner.first("inference")
    raw = result.get("raw", {})
    med = {name: {k: median(v) for k, v in phases.items()} for name, phases in raw.items()}
    rows = []
    for phase, label in (("prefill_s", f"prefill {params.prefill_tokens} tokens"),
                         ("decode_s", f"decode {params.decode_steps} steps (KV cache)")):
        o = med.get("ours", {}).get(phase)
        m = med.get("merged", {}).get(phase)
        rows.append(ratio_target(f"{label} (s): ours vs merged", o, m, "<= 1.05", "s"))
    section = {"medians": med, "raw": raw, "same_greedy_tokens": result.get("same_tokens"),
               "error": result.get("error") or result.get("timed_out")}
    return section, rows


def training_section(runner: Runner, shape: Shape) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """bench.json's ``training`` section and its rows: step time and gradient + optimizer-state bytes,
    ours vs the legacy recipe, and ours vs the rows-only expectation."""
    ours, legacy = runner.first("train-ours"), runner.first("train-legacy")
    rows_bytes = rows_bytes_of(shape)
    # gradient + AdamW exp_avg + exp_avg_sq, each rows-shaped; plus one fp32 'step' scalar per parameter
    expected = 3 * rows_bytes + 2 * 4
    o_s, l_s = median(ours.get("step_s", [])), median(legacy.get("step_s", []))
    rows = [
        ratio_target("training step time (s): ours vs legacy", o_s, l_s, "<= 0.8", "s"),
        target("gradient + optimizer state bytes: ours vs rows-only expectation", ours.get("state_bytes"), expected,
               ratio(ours.get("state_bytes"), expected), "ours == 3 x rows bytes + 2 step scalars",
               None if "state_bytes" not in ours else ours["state_bytes"] == expected, "bytes"),
        info("gradient + optimizer state bytes: legacy vs ours", legacy.get("state_bytes"), ours.get("state_bytes"),
             ratio(legacy.get("state_bytes"), ours.get("state_bytes")), "bytes", "info (legacy/ours)"),
        info("training process peak RSS: legacy vs ours", legacy.get("peak_rss_bytes"), ours.get("peak_rss_bytes"),
             ratio(legacy.get("peak_rss_bytes"), ours.get("peak_rss_bytes")), "bytes", "info (legacy/ours)"),
    ]
    section = {"ours": ours, "legacy": legacy, "rows_bytes": rows_bytes, "expected_ours_state_bytes": expected,
               "ours_recipe": "PeftModel.from_pretrained(base, adapter, is_trainable=True); AdamW(lr=1e-4) over "
                              "the trainable parameters (the two row blocks)",
               "legacy_recipe": "the resized model (loaded from the merged checkpoint: same weights as resize, "
                                "resize, copy rows), requires_grad only on embed_tokens.weight and lm_head.weight, "
                                "tensor hook grad.clone(); grad[:text_vocab_size] = 0; AdamW(lr=1e-4) over them",
               "timing": "median over reps steps after one warm-up step; a step = forward with labels, backward, "
                         "optimizer.step(), zero_grad(set_to_none=True)"}
    return section, rows


def size_section(runner: Runner, paths: Paths, shape: Shape) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """bench.json's ``size_and_conversion`` section and its rows: adapter bytes vs the rows' bytes and
    vs PEFT's modules_to_save, and convert_legacy time vs a plain torch.load + save_file."""
    rows_bytes = rows_bytes_of(shape)
    modules_to_save = 2 * head_matrix_bytes(shape)
    adapter = dir_bytes(paths.adapter)
    files = {p.name: p.stat().st_size for p in sorted(paths.adapter.iterdir()) if p.is_file()}
    conv, plain = runner.values("convert-ours", "seconds"), runner.values("convert-plain", "seconds")
    rows = [
        target("adapter directory size: ours vs rows bytes", adapter, rows_bytes, ratio(adapter, rows_bytes),
               "<= rows + 1 MB (1,000,000 B)", adapter <= rows_bytes + MB, "bytes"),
        info("PEFT modules_to_save alternative vs our adapter dir", modules_to_save, adapter,
             ratio(modules_to_save, adapter), "bytes", "info (2 full vocab x hidden bf16 matrices, from shapes)"),
        ratio_target("convert_legacy time (s): ours vs torch.load + save_file", median(conv), median(plain),
                     "<= 1.5", "s"),
    ]
    section = {"adapter_dir_bytes": adapter, "adapter_files": files, "rows_bytes": rows_bytes,
               "modules_to_save_bytes": modules_to_save, "legacy_pt_bytes": paths.legacy_pt.stat().st_size,
               "base_dir_bytes": dir_bytes(paths.base), "merged_dir_bytes": dir_bytes(paths.merged),
               "convert_ours_s": conv, "convert_plain_s": plain}
    return section, rows


def merge_section(runner: Runner, params: Params) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """bench.json's ``merge`` section and its rows, per ``merge_layers`` count: the time of uti-peft merge vs the
    copy limit (a kernel copy of the base + the rows written: the target) and vs PEFT's way (information), peak RSS,
    and whether uti-peft and PEFT wrote the same tensors."""
    largest = head_matrix_bytes(params.shape)  # the extended embedding / lm_head
    limit = 2 * largest + 512 * 2**20
    rows, section = [], {"largest_merged_tensor_bytes": largest, "peak_rss_limit_bytes": limit, "layers": {}}
    for layers in params.merge_layers:
        ours, peft, floor = f"merge-ours-{layers}L", f"merge-peft-{layers}L", f"merge-floor-{layers}L"
        o_s, p_s = median(runner.values(ours, "seconds")), median(runner.values(peft, "seconds"))
        f_s = median(runner.values(floor, "seconds"))
        o_rss, p_rss = median(runner.values(ours, "peak_rss_bytes")), median(runner.values(peft, "peak_rss_bytes"))
        rows.append(ratio_target(f"merge + write, {layers} layer(s): uti-peft merge vs the copy floor (cp of the "
                                 "base + the rows)", o_s, f_s, "<= 1.2", "s"))
        rows.append(info(f"merge + write, {layers} layer(s) (s): uti-peft merge vs PEFT merge_and_unload + "
                         "save_pretrained", o_s, p_s, ratio(o_s, p_s), "s"))
        rows.append(target(f"merge peak RSS, {layers} layer(s): uti-peft merge vs 2 x largest merged tensor + 512 MiB",
                           o_rss, limit, ratio(o_rss, limit), f"<= {limit:,} B", None if o_rss is None else
                           o_rss <= limit, "bytes"))
        rows.append(info(f"merge peak RSS, {layers} layer(s): PEFT vs uti-peft merge", p_rss, o_rss,
                         ratio(p_rss, o_rss), "bytes", "info (peft/ours)"))
        e_s, e_rss = median(runner.values(f"extract-{layers}L", "seconds")), median(
            runner.values(f"extract-{layers}L", "peak_rss_bytes"))
        rows.append(info(f"extract (merged checkpoint -> rows), {layers} layer(s) (s): uti-peft extract vs uti-peft "
                         "merge", e_s, o_s, ratio(e_s, o_s), "s"))
        rows.append(info(f"extract peak RSS, {layers} layer(s): uti-peft extract vs uti-peft merge", e_rss, o_rss,
                         ratio(e_rss, o_rss), "bytes"))
        extracted = [r.get("rows_identical") for r in runner.results.get(f"extract-{layers}L", [])]
        digests = {r.get("tensors_sha256") for case in (ours, peft) for r in runner.results.get(case, [])}
        section["layers"][str(layers)] = {
            "ours_s": o_s, "floor_s": f_s, "peft_s": p_s, "ours_over_floor": ratio(o_s, f_s),
            "ours_over_peft": ratio(o_s, p_s), "ours_peak_rss_bytes": o_rss, "peft_peak_rss_bytes": p_rss,
            "floor_peak_rss_bytes": median(runner.values(floor, "peak_rss_bytes")),
            "ours_written_bytes": median(runner.values(ours, "written_bytes")),
            "floor_written_bytes": median(runner.values(floor, "written_bytes")),
            "peft_written_bytes": median(runner.values(peft, "written_bytes")),
            "tensors_identical": len(digests) == 1 and None not in digests,
            "extract_s": e_s, "extract_peak_rss_bytes": e_rss,
            "extract_rows_identical": bool(extracted) and all(x is True for x in extracted),
        }
    return section, rows


def peers_section(runner: Runner, paths: Paths, params: Params,
                  tied: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """bench.json's ``peers`` (``tied``: ``peers_tied``) section and its rows (issue #26): uti-peft against PEFT's
    own ways of training the new rows (``PEERS``), per axis against the best peer on that axis (the goal: at least
    as good as the best): load + first forward time, steady and peak RSS (the load cases at the main depth; peers
    resize the base first), training step time and gradient + optimizer-state bytes, adapter bytes on disk, and
    whether the last-token logits after load equal the legacy recipe's (the same digest). ``tied``: the same on the
    tied base of the same widths (``Paths.tied``)."""
    suffix, where, title = ("-tied", paths.tied, "peers (tied base)") if tied else ("", paths, "peers")
    ours_load_case = "load-ours-tied" if tied else f"load-ours-{params.shape.layers}L"
    ours_load = load_medians(runner, ours_load_case)

    def digests(case: str) -> set:
        return {r["logits_sha256"] for r in runner.results.get(case, []) if r.get("logits_sha256")}

    legacy = digests(f"load-legacy-nomean{suffix}") | (set() if tied else digests("load-legacy"))

    def equal_to_legacy(case: str) -> Optional[bool]:
        found = digests(case)
        return None if not found or not legacy else found == legacy

    def measures(load_case: str, train_case: str, adapter) -> dict[str, Any]:
        load, train = load_medians(runner, load_case), runner.first(train_case)
        return {"load_s": load["seconds"], "steady_rss_bytes": load["steady_rss_bytes"],
                "peak_rss_bytes": load["peak_rss_bytes"], "phases": load["phases"],
                "train_step_s": median(train.get("step_s", [])), "state_bytes": train.get("state_bytes"),
                "trainable_params": train.get("trainable_params"), "train_peak_rss_bytes": train.get("peak_rss_bytes"),
                "adapter_bytes": dir_bytes(adapter) if adapter.is_dir() else None,
                "logits_equal_legacy": equal_to_legacy(load_case)}

    ours = measures(ours_load_case, f"train-ours{suffix}", where.adapter)
    ours["load_s"], ours["phases"] = ours_load["seconds"], ours_load["phases"]
    peers = {kind: measures(f"load-peer-{kind}{suffix}", f"train-peer-{kind}{suffix}", where.peer(kind))
             for kind in PEERS}
    rows = []
    for key, label, unit, goal in (
            ("load_s", "load + first forward (s), peers resizing the base first", "s", True),
            ("steady_rss_bytes", "steady RSS after load + forward", "bytes", True),
            ("peak_rss_bytes", "peak RSS during load + forward", "bytes", False),
            ("train_step_s", "training step time (s)", "s", True),
            ("state_bytes", "gradient + optimizer state bytes", "bytes", True),
            ("adapter_bytes", "adapter bytes on disk", "bytes", True)):
        measured = {kind: data[key] for kind, data in peers.items() if data[key] is not None}
        best = min(measured, key=measured.get, default=None)
        name = f"{title}, {label}: ours vs the best peer ({best or 'none measured'})"
        reference = None if best is None else measured[best]
        if goal:
            rows.append(ratio_target(name, ours[key], reference, "<= 1.0", unit))
        else:
            rows.append(info(name, ours[key], reference, ratio(ours[key], reference), unit))
    equal = {kind: data["logits_equal_legacy"] for kind, data in peers.items()}
    rows.append(target(f"{title}, last-token logits after load == the legacy recipe's (torch.equal via digest)",
                       ours["logits_equal_legacy"], ", ".join(f"{k}: {fmt(v, '')}" for k, v in equal.items()), None,
                       "ours equal", ours["logits_equal_legacy"]))
    section = {"ours": ours, "peers": peers, "legacy_logits_sha256": sorted(legacy),
               "recipes": {"trainable-tokens": "base + resize_token_embeddings(vocab_size, mean_resizing=False) + "
                                               "PeftModel.from_pretrained of a TrainableTokensConfig(target_modules="
                                               + ("['embed_tokens']" if tied else "['embed_tokens', 'lm_head']")
                                               + ", token_indices=text_vocab..vocab_size-1) adapter",
                           "lora-modules-to-save": "base + resize + PeftModel.from_pretrained of a LoraConfig(r=8, "
                                                   "q_proj, modules_to_save=['embed_tokens', 'lm_head']"
                                                   + (", ensure_weight_tying=True" if tied else "") + ") adapter",
                           "training": "as the peer's load but on the merged checkpoint (the resized base), "
                                       "is_trainable=True; the step as train-ours"}}
    return section, rows


def machine_info() -> dict[str, Any]:
    """CPU, cores, RAM and library versions: what a timing depends on besides the code."""
    import peft
    import safetensors
    import transformers

    cpu = "unknown"
    flags: set[str] = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    with open("/proc/meminfo") as f:
        mem_total = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    return {
        "cpu_model": cpu,
        "cpu_flags_of_note": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma"}),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": mem_total,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    }


def fmt(value: Any, unit: str) -> str:
    """One table cell: bytes as MB, seconds with 3 decimals, text as it is, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if unit == "bytes":
        return f"{value / 1e6:,.1f} MB"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "GB/s":
        return f"{value:.2f} GB/s"
    return f"{value:,}"


def markdown(report: dict[str, Any]) -> str:
    """bench.md: the machine and shape in two sentences, the table, the memory method, the notes, setup times."""
    p = report["parameters"]
    s = p["shape"]
    m = report["machine"]
    lines = [
        "# uti-peft benchmark" + (" (--quick: tiny shapes, timings meaningless)" if p["quick"] else ""),
        "",
        f"{m['cpu_model']}, {m['cores_usable']} cores, {m['ram_bytes'] / 2**30:.0f} GiB RAM; torch {m['torch']}, "
        f"transformers {m['transformers']}, peft {m['peft']}. Load average {m['loadavg_start']} -> "
        f"{m.get('loadavg_end')}.",
        "",
        f"Qwen3, {s['layers']} decoder layer(s) (loads: {', '.join(map(str, p['depths']))}) (hidden {s['hidden']}, intermediate {s['intermediate']}, "
        f"{s['heads']}/{s['kv_heads']} heads, head_dim {s['head_dim']}), base rows {s['vocab_rows']:,}, "
        f"text {s['text_vocab']:,} + new {s['new_rows']:,} = {s['vocab_size']:,} rows, {p['dtype']}, untied. "
        f"Medians of {p['load_reps']} (loads of the sweep) or {p['reps']} repetition(s); prefill {p['prefill_tokens']} tokens, decode {p['decode_steps']} "
        f"steps, training batch 1 x {p['train_seq_len']}.",
        "",
        "| measurement | ours | reference | ratio | target | met? |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["table"]:
        met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
        value = "n/a" if row["ratio"] is None else f"{row['ratio']:.3f}"
        lines.append(f"| {row['measurement']} | {fmt(row['ours'], row['unit'])} | "
                     f"{fmt(row['reference'], row['unit'])} | {value} | {row['target']} | {met} |")
    lines += ["", f"Memory: {RSS_METHOD}", "", "Notes:", ""]
    lines += [f"- {note}" for note in report["notes"]]
    setup = ", ".join(f"{k} {v:.1f}" for k, v in report["setup_s"].items())
    lines += ["", f"Setup (s): {setup}. Total bench time: {report['bench_wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def notes(params: Params) -> list[str]:
    """What this run does differently from the issue's wording, and why (also printed in bench.md)."""
    shape = params.shape
    out = [
        f"Loads are measured at {', '.join(map(str, params.depths))} decoder layer(s) of Qwen3-8B's shapes (one base "
        "and one merged checkpoint each; Qwen3-8B has 36): ours adds a fixed cost to a time that grows with depth, "
        "so the shallowest depth is the worst case. The other cases use the "
        f"{shape.layers}-layer base: the embedding and lm_head are what differ between the cases.",
        f"Load: each repetition is a fresh process, {params.load_reps} per case and depth, ours and merged "
        "alternating which goes first, after one read of the depth's files (all in the page cache); the clock "
        f"covers the checkpoint load and the first forward of {params.load_probe_tokens} ids that include new "
        "ids (use_cache=True, last-token logits: generate's prefill), then "
        f"{params.warm_forwards - 1} more forwards of the same ids are timed. The first forward varies by tens "
        "of ms from run to run in both; the per-repetition ratios and the load alone (no forward) show the fixed "
        "cost without that noise. Phases of ours are timed by wrapping the library functions that do them, for "
        "the duration of the load (scripts/bench/cases.py time_load_phases).",
        "Head build: a fresh process per variant loads the base (memory-mapped) and builds the extended lm_head "
        "matrix from it, then reads its text rows once: by mapping the file again (ours), by the copy fallback "
        "(used where the base is not a clean file mapping), and by a plain torch copy (then the same copy again "
        "between resident buffers: memory speed).",
        "Legacy loads (transformers defaults, and mean_resizing=False) run once each; the defaults one is stopped "
        f"after {params.legacy_timeout:g} s and reported as a lower bound.",
        "All load cases import the same modules (torch, transformers, peft, uti_peft), so their RSS baselines match.",
        "Training, ours: PeftModel.from_pretrained(base, adapter, is_trainable=True) (get_peft_model's layers; "
        "its from-scratch row init is timed in setup_s.get_peft_model_s). Legacy: the resized model is loaded from "
        "the merged checkpoint (bit-identical weights to resize + resize + copy rows, see the logits digests).",
        f"Training batch 1 x {params.train_seq_len}, {params.train_steps} timed step(s) after a "
        + ("full warm-up step." if params.full_warmup else "warm-up of one forward + one optimizer step on zero "
           "gradients (allocates the AdamW state and faults the weights in without paying for a backward)."),
        f"Inference: prefill {params.prefill_tokens} tokens (last-token logits only, as generate() does) and "
        f"{params.decode_steps} greedy decode steps with the KV cache, explicit loop; ours and merged alternate.",
    ]
    out.append(f"Merge: the rows-only adapter into bases of {', '.join(map(str, params.merge_layers))} "
               "decoder layer(s); uti-peft merge streams the shards (unchanged tensors copied by the kernel), PEFT's "
               "way loads the base (memory-mapped), merges and saves. The bases have no tokenizer, so neither writes "
               "one. The target is against the copy floor (merge-floor: shutil.copyfile of every file of the base, "
               "i.e. sendfile/copy_file_range, then save_file of the adapter's rows): what writing the merged "
               "checkpoint costs at the least on this machine; PEFT's way is information. uti-peft merge alternates "
               "with each of them, so it runs twice as often; its median covers all its runs. The machine is shared: "
               "timings are noisy.")
    out.append("Peers (issue #26): PEFT's TrainableTokens (the new ids, embedding and untied lm_head) and LoRA "
               "(q_proj) with modules_to_save=['embed_tokens', 'lm_head'], each saved once from the resized model "
               "whose new rows are the adapter's. Their loads resize the base first (resize_token_embeddings("
               "vocab_size, mean_resizing=False): the user's step; the adapter overwrites the new rows) and alternate "
               "with ours at the main depth; their training steps load the merged checkpoint as the resized base, "
               "as the legacy recipe does. Each axis is compared with the best peer on it. The same again on a "
               "tied base of the same widths ('peers (tied base)'): TrainableTokens on the embedding alone (PEFT "
               "ties the head's layer to it) and LoRA with ensure_weight_tying=True, against ours on that base.")
    if not params.quick:
        out.append("On CPUs without native bf16 (AVX2), PyTorch's bf16 matmul grad_out @ weight with K = vocab (the "
                   "lm_head's input gradient) runs at ~0.3 GFLOP/s (~20 s per token at this shape): the legacy recipe "
                   "pays it, uti-peft's backward accumulates that product in float32 blocks on the CPU instead; hence "
                   "the short default sequence. Issue sizes on a bigger machine: --prefill-tokens 512 "
                   "--decode-steps 32 --train-seq-len 512 --train-steps 3 --full-warmup.")
    return out


def build_report(runner: Runner, paths: Paths, params: Params, setup: dict, started: float) -> dict[str, Any]:
    """bench.json: every section, the raw results, the table and the count of targets met."""
    load, load_rows = load_section(runner, params)
    head, head_rows = head_build_section(runner)
    infer, infer_rows = inference_section(runner, params)
    switch, switch_rows = switch_section(runner)
    head_loss, head_loss_rows = head_loss_section(runner)
    train, train_rows = training_section(runner, params.shape)
    size, size_rows = size_section(runner, paths, params.shape)
    merge, merge_rows = merge_section(runner, params)
    peers, peers_rows = peers_section(runner, paths, params)
    peers_tied, peers_tied_rows = peers_section(runner, paths, params, tied=True)
    table = (load_rows + head_rows + infer_rows + switch_rows + head_loss_rows + train_rows + size_rows + merge_rows
             + peers_rows + peers_tied_rows)
    targets = [row for row in table if row["kind"] == "target"]
    return {
        "machine": machine_info(),
        "parameters": params.to_dict(),
        "notes": notes(params),
        "setup_s": setup,
        "load": load,
        "head_build": head,
        "inference": infer,
        "switch": switch,
        "head_loss": head_loss,
        "training": train,
        "size_and_conversion": size,
        "merge": merge,
        "peers": peers,
        "peers_tied": peers_tied,
        "raw": runner.results,
        "table": table,
        "targets_met": sum(bool(row["met"]) for row in targets),
        "targets_total": len(targets),
        "targets_missed": [row["measurement"] for row in targets if row["met"] is not True],
        "bench_wall_s": time.perf_counter() - started,
    }
