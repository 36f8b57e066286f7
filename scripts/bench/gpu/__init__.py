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

