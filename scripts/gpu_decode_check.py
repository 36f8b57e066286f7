"""Decode exactness, step by step: uti-peft vs its own merge_and_unload(), greedy with the KV cache.

    python scripts/gpu_decode_check.py LAYERS        # Qwen3-8B widths, random bf16 weights, on cuda
    DEV=cpu HIDDEN=256 python scripts/gpu_decode_check.py 1   # the same check, small, on the CPU

Prefills 128 ids (new ids among them), then 64 greedy steps feeding both models the same token, and compares the
embedding output, the head's input and output and the argmax at every step (forward hooks). Prints a JSON report.
"""
import copy, json, sys, time
import torch
t0 = time.time()
import uti_peft
from peft import get_peft_model
from transformers import Qwen3Config, Qwen3ForCausalLM
from uti_peft.tiny import build_token_space

import os
dev = os.environ.get("DEV", "cuda")
H = int(os.environ.get("HIDDEN", "4096"))
space = build_token_space(151669, image_size=8192, codebook_size=1024, base_text_model="x")
cfg = Qwen3Config(vocab_size=151936, hidden_size=H, intermediate_size=3 * H, num_hidden_layers=int(sys.argv[1]),
                  num_attention_heads=H // 128, num_key_value_heads=max(1, H // 512), head_dim=128, max_position_embeddings=4096,
                  tie_word_embeddings=False)
torch.manual_seed(0)
with torch.device(dev):
    base = Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval()
ours = get_peft_model(base, uti_peft.RowExtensionConfig(token_space=space)).eval()
merged = copy.deepcopy(ours).merge_and_unload().eval()
for p in merged.parameters():
    p.requires_grad_(True)  # as from_pretrained leaves them
report = {"layers": cfg.num_hidden_layers, "setup_s": round(time.time() - t0, 1)}
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, space.vocab_size, (1, 128), generator=g).to(dev)
captured = {}
def hook(name):
    def f(mod, args, out):
        captured[name] = (args[0].detach().clone() if args else None, out.detach().clone())
    return f
for tag, m in (("ours", ours), ("merged", merged)):
    m.get_input_embeddings().register_forward_hook(hook(tag + ".embed"))
    m.get_output_embeddings().register_forward_hook(hook(tag + ".head"))
steps = []
with torch.inference_mode():
    o = ours(input_ids=ids, use_cache=True, logits_to_keep=1)
    r = merged(input_ids=ids, use_cache=True, logits_to_keep=1)
    report["prefill_equal"] = bool(torch.equal(o.logits, r.logits))
    report["output_fields"] = list(o.keys())
    tok = o.logits[:, -1].argmax(-1, keepdim=True)
    po, pr = o.past_key_values, r.past_key_values
    for step in range(64):
        o = ours(input_ids=tok, past_key_values=po, use_cache=True)
        r = merged(input_ids=tok, past_key_values=pr, use_cache=True)
        po, pr = o.past_key_values, r.past_key_values
        e = torch.equal(captured["ours.embed"][1], captured["merged.embed"][1])
        hi = torch.equal(captured["ours.head"][0], captured["merged.head"][0])
        ho = torch.equal(captured["ours.head"][1], captured["merged.head"][1])
        head_in = captured["ours.head"][0]
        steps.append({"step": step, "token": int(tok), "new_token": int(tok) >= 151669, "embed_eq": e, "head_in_eq": hi,
                      "head_out_eq": ho, "max_diff": float((o.logits.float() - r.logits.float()).abs().max()),
                      "same_argmax": bool(torch.equal(o.logits[:, -1].argmax(-1), r.logits[:, -1].argmax(-1))),
                      "head_in_shape": list(head_in.shape), "head_in_stride": list(head_in.stride())})
        tok = o.logits[:, -1].argmax(-1, keepdim=True)
    # the head alone on the same input, both weights, 2-D and 3-D
    x = captured["ours.head"][0]
    w_o = ours.get_output_embeddings().base_layer.weight
    w_m = merged.get_output_embeddings().weight
    report["weights_equal"] = bool(torch.equal(w_o, w_m))
    report["weight_ptr_mod_256"] = [w_o.data_ptr() % 256, w_m.data_ptr() % 256]
    report["head_3d_vs_2d_equal_merged"] = bool(torch.equal(torch.nn.functional.linear(x, w_m), torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), w_m).view(*x.shape[:-1], -1)))
    report["head_same_fn_diff_weights_equal"] = bool(torch.equal(torch.nn.functional.linear(x, w_o), torch.nn.functional.linear(x, w_m)))
report["first_mismatch"] = next((s for s in steps if not (s["embed_eq"] and s["head_in_eq"] and s["head_out_eq"])), None)
report["n_head_out_mismatch"] = sum(not s["head_out_eq"] for s in steps)
report["n_head_in_mismatch"] = sum(not s["head_in_eq"] for s in steps)
report["n_argmax_mismatch"] = sum(not s["same_argmax"] for s in steps)
report["total_s"] = round(time.time() - t0, 1)
print(json.dumps(report, indent=1))
