"""The child side: the loaders onto the device and one function per measured case, run in a fresh process
(``python scripts/bench_gpu.py --case NAME``), each printing one JSON line."""

from __future__ import annotations

import gc
import json
import os
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..cases import greedy, import_model_stack, legacy_patch, legacy_training_model, state_bytes
from ..params import DTYPE, Paths
from ..probes import probe_ids, tensor_sha256
from .params import GpuParams, PARAMS_NAME, clock, device_facts, memory, reset_peak, sync


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
    models = {"ours": load_ours(paths, params), "merged": load_merged(paths, params)}
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
    if kind == "ours":
        model = load_ours(paths, params, trainable=True)
    else:
        model = legacy_training_model(paths, params, load=load_merged)
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
