"""The child side: one function per measured case, run in a fresh process (``python scripts/bench.py --case NAME``)
so that no case inherits another's memory or warm state. Each returns a JSON-able dict: one line on stdout.

Cases: load (+ one forward) of ours / merged / legacy, inference (prefill + greedy decode, ours vs merged),
training step (ours vs the legacy recipe), conversion (``convert_legacy`` vs torch.load + save_file), merge
(``uti_peft.merge_adapter`` vs PEFT's ``merge_and_unload`` + ``save_pretrained``). ``CASES`` names them all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .params import DTYPE, Params, Paths, Shape
from .probes import dir_bytes, kill_after, probe_ids, proc_status, reset_peak_rss, steady_memory, tensor_sha256


def import_model_stack() -> None:
    """Every load case imports the same modules, so that their RSS baselines are equal."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import uti_peft  # noqa: F401  (registers ROW_EXTENSION)


def load_base(path: Path):
    """The checkpoint at ``path`` in bf16, as every load case reads it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE)


def load_ours(paths: Paths, params: Params):
    """Base checkpoint + ``PeftModel.from_pretrained`` (resize + patch, by uti-peft)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(paths.base), paths.adapter)


def load_merged(paths: Paths, params: Params):
    """The merged checkpoint: what a plain resized model costs to load."""
    return load_base(paths.merged)


def legacy_patch(model, paths: Paths, shape: Shape, mean_resizing: Optional[bool]):
    """The legacy loader (tests/conftest.py legacy_patch): resize to text_vocab_size, then to vocab_size,
    copy the rows of ``trainable_rows.pt`` in. ``mean_resizing=None`` leaves transformers' default (True)."""
    kwargs = {} if mean_resizing is None else {"mean_resizing": mean_resizing}
    model.resize_token_embeddings(shape.text_vocab, **kwargs)
    model.resize_token_embeddings(shape.vocab_size, **kwargs)
    ckpt = torch.load(paths.legacy_pt, map_location="cpu", weights_only=True)
    with torch.no_grad():
        model.get_input_embeddings().weight[shape.text_vocab :] = ckpt["embeddings"]
        model.get_output_embeddings().weight[shape.text_vocab :] = ckpt["lm_head"]
    model.config.pad_token_id = json.loads(paths.token_space.read_text())["special_tokens"]["<|pad_mm|>"]
    return model


def load_legacy_default(paths: Paths, params: Params):
    """The legacy loader with transformers' defaults (mean-resizing: slow, run under a time limit)."""
    return legacy_patch(load_base(paths.base), paths, params.shape, mean_resizing=None)


def load_legacy_nomean(paths: Paths, params: Params):
    """The legacy loader with ``mean_resizing=False``: what the legacy path costs without the mean."""
    return legacy_patch(load_base(paths.base), paths, params.shape, mean_resizing=False)


LOADERS: dict[str, Callable[[Paths, Params], Any]] = {
    "ours": load_ours,
    "merged": load_merged,
    "legacy": load_legacy_default,
    "legacy_nomean": load_legacy_nomean,
}


def case_load(kind: str, paths: Paths, params: Params) -> dict[str, Any]:
    """Time load + one short forward (last-token logits), then read steady and peak RSS."""
    import_model_stack()
    before = proc_status()["VmRSS"]
    peak_reset = reset_peak_rss()
    ids = probe_ids(params.shape, params.load_probe_tokens, params.seed)
    if kind == "legacy":
        kill_after(params.legacy_timeout)
    start = time.perf_counter()
    model = LOADERS[kind](paths, params)
    loaded = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=ids, logits_to_keep=1).logits
    done = time.perf_counter()
    kill_after(0)
    return {
        "load_s": loaded - start,
        "forward_s": done - loaded,
        "seconds": done - start,
        "rss_after_imports_bytes": before,
        "peak_reset": peak_reset,
        "logits_width": logits.shape[-1],
        "logits_sha256": tensor_sha256(logits[0, -1]),
        **steady_memory(),
    }


def greedy(model, ids: torch.Tensor, steps: int) -> tuple[float, float, list[int]]:
    """Prefill ``ids`` (last-token logits only, as ``generate`` does), then ``steps`` greedy decode steps with
    the KV cache. Returns (prefill seconds, decode seconds, generated ids)."""
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        prefilled = time.perf_counter()
        tokens = [int(token)]
        for _ in range(steps):
            out = model(input_ids=token, cache=out.cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
        done = time.perf_counter()
    return prefilled - start, done - prefilled, tokens


def case_inference(paths: Paths, params: Params) -> dict[str, Any]:
    """Adapter model vs. merged model in one process, run alternately (ABBA order) after a warm-up."""
    import_model_stack()
    models = {"ours": load_ours(paths, params), "merged": load_merged(paths, params)}
    ids = probe_ids(params.shape, params.prefill_tokens, params.seed + 1)
    for model in models.values():  # warm-up: kernels, allocator
        greedy(model, ids[:, :8], 1)
    raw: dict[str, dict[str, list]] = {name: {"prefill_s": [], "decode_s": []} for name in models}
    tokens: dict[str, list[int]] = {}
    for rep in range(params.reps):
        order = list(models) if rep % 2 == 0 else list(reversed(models))
        for name in order:
            prefill_s, decode_s, tokens[name] = greedy(models[name], ids, params.decode_steps)
            raw[name]["prefill_s"].append(prefill_s)
            raw[name]["decode_s"].append(decode_s)
    return {"raw": raw, "same_tokens": tokens["ours"] == tokens["merged"], **steady_memory()}


def legacy_training_model(paths: Paths, params: Params):
    """The legacy recipe: the resized model, whole embedding and lm_head trainable, the rest frozen, and a hook
    zeroing the text rows' gradient (into a fresh tensor: tensor hooks must not modify their input).

    The resized model is loaded from the merged checkpoint: its weights equal the legacy-patched model's bit for
    bit (the load cases check the logits) and it loads in ~1 s instead of the ~40 s of two resizes."""
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


def ours_training_model(paths: Paths, params: Params):
    """The adapter loaded trainable: only the new rows are parameters (the same layers ``get_peft_model`` builds;
    its from-scratch row initialisation is timed in the setup instead, see setup_s.get_peft_model_s)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(paths.base), paths.adapter, is_trainable=True)


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of gradients (params holding .grad) and of every tensor in the optimizer state."""
    unique = {id(p): p for p in model.parameters()}.values()
    grads = sum(p.grad.nbytes for p in unique if p.grad is not None)
    moments = scalars = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                if value.dim() == 0:
                    scalars += value.nbytes
                else:
                    moments += value.nbytes
    return {
        "grad_bytes": grads,
        "optimizer_tensor_bytes": moments,
        "optimizer_scalar_bytes": scalars,
        "state_bytes": grads + moments + scalars,
    }


def prime(model, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    """Warm-up that does not pay for a backward pass (~20 s per token at full shape on an AVX2 CPU, see
    --train-steps): a forward, and an optimizer step on zero gradients, which allocates the AdamW state and faults
    the weights in (copy-on-write pages of the memory-mapped checkpoint); the weights barely move."""
    with torch.no_grad():
        model(input_ids=batch)
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def case_train(kind: str, paths: Paths, params: Params) -> dict[str, Any]:
    """A warm-up (`prime`, or a full step with --full-warmup), then ``train_steps`` timed AdamW steps on a batch
    of 1 x ``train_seq_len`` ids; the gradient and optimizer-state bytes are read at the last step, before
    ``zero_grad``."""
    import_model_stack()
    model = (ours_training_model if kind == "ours" else legacy_training_model)(paths, params)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch = probe_ids(params.shape, params.train_seq_len, params.seed + 2)
    model.train()
    if params.full_warmup:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        prime(model, optimizer, batch)
    phases: dict[str, list[float]] = {"step_s": [], "forward_s": [], "backward_s": [], "optimizer_s": []}
    measured: dict[str, int] = {}
    for step in range(params.train_steps):
        t0 = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        if step == params.train_steps - 1:
            measured = state_bytes(model, optimizer)  # the same at every step
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        for key, value in (("step_s", t4 - t0), ("forward_s", t1 - t0), ("backward_s", t2 - t1),
                           ("optimizer_s", t3 - t2)):
            phases[key].append(value)
    return {
        **phases,
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_shapes": [list(p.shape) for p in trainable],
        "loss": float(loss),
        **measured,
        **steady_memory(),
    }


def case_convert(kind: str, paths: Paths, params: Params) -> dict[str, Any]:
    """``convert_legacy`` vs. the plain work it has to do: torch.load the .pt and save_file the rows."""
    from safetensors.torch import save_file

    if kind == "ours":
        import uti_peft
    out = paths.scratch(f"convert-{kind}-{os.getpid()}")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    if kind == "ours":
        uti_peft.convert_legacy(paths.legacy, out, progress=False)
    else:
        out.mkdir(parents=True)
        ckpt = torch.load(paths.legacy_pt, map_location="cpu", weights_only=True)
        rows = {"input_embeddings.new_rows": ckpt["embeddings"], "output_embeddings.new_rows": ckpt["lm_head"]}
        save_file(rows, str(out / "adapter_model.safetensors"))
    seconds = time.perf_counter() - start
    written = dir_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "written_bytes": written, **steady_memory()}


def merged_tensors_sha256(out: Path) -> str:
    """One digest over every tensor written (name, dtype, shape, bytes; in name order, across shards)."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    files = sorted(out.glob("*.safetensors"))
    names = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            names.update({name: path for name in f.keys()})
    for name in sorted(names):
        with safe_open(str(names[name]), framework="pt") as f:
            tensor = f.get_tensor(name)
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def case_merge(kind: str, layers: int, paths: Paths, params: Params) -> dict[str, Any]:
    """Merge the adapter into the ``layers``-layer base and write the checkpoint: ``uti_peft.merge_adapter``
    (streamed) or PEFT's way (load, ``merge_and_unload()``, ``save_pretrained``). Time and peak RSS cover the
    whole job; the digest of what was written is taken afterwards."""
    import_model_stack()
    import uti_peft

    before = proc_status()["VmRSS"]
    peak_reset = reset_peak_rss()
    base, out = paths.merge_base(params, layers), paths.scratch(f"merge-{kind}-{layers}L-{os.getpid()}")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    if kind == "ours":
        uti_peft.merge_adapter(base, paths.adapter, out, progress=False)
    else:
        from peft import PeftModel

        PeftModel.from_pretrained(load_base(base), paths.adapter).merge_and_unload().save_pretrained(out)
    seconds = time.perf_counter() - start
    peak = proc_status()["VmHWM"]
    result = {"seconds": seconds, "peak_rss_bytes": peak, "rss_after_imports_bytes": before, "peak_reset": peak_reset,
              "written_bytes": dir_bytes(out), "tensors_sha256": merged_tensors_sha256(out)}
    shutil.rmtree(out, ignore_errors=True)
    return result


MERGE_LAYER_CHOICES = range(1, 9)  # --merge-layers values that have a case

CASES: dict[str, Callable[[Paths, Params], dict[str, Any]]] = {
    "load-ours": lambda p, q: case_load("ours", p, q),
    "load-merged": lambda p, q: case_load("merged", p, q),
    "load-legacy": lambda p, q: case_load("legacy", p, q),
    "load-legacy-nomean": lambda p, q: case_load("legacy_nomean", p, q),
    "inference": case_inference,
    "train-ours": lambda p, q: case_train("ours", p, q),
    "train-legacy": lambda p, q: case_train("legacy", p, q),
    "convert-ours": lambda p, q: case_convert("ours", p, q),
    "convert-plain": lambda p, q: case_convert("plain", p, q),
    **{f"merge-{kind}-{n}L": (lambda p, q, kind=kind, n=n: case_merge(kind, n, p, q))
       for kind in ("ours", "peft") for n in MERGE_LAYER_CHOICES},
}


def run_cases_here(names: list[str], workdir: Path) -> None:
    """Child-process entry point: run the cases in order, one JSON line each on stdout."""
    import warnings

    warnings.filterwarnings("ignore")
    paths = Paths(workdir)
    params = Params.from_dict(json.loads(paths.params.read_text()))
    torch.manual_seed(params.seed)
    for name in names:
        result = {"case": name, "pid": os.getpid(), **CASES[name](paths, params)}
        print(json.dumps(result), flush=True)
