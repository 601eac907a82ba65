"""Steered generation speed on the embedded model.

RESULT steered_generate_vs_hf = time(emolens greedy generation with an additive intervention
                                     at one layer, every position)
                                / time(raw transformers generate, same prompts, same forced
                                       token count, SDPA attention, KV cache)        target <= 1.05
       per_row_steer_vs_hf    = the same with a different vector and strength per batch row
                                (per-request steering, one Add(per_row=True))       target <= 1.05

Also printed (not targets): scale/zero interventions on attn_out, mlp_out, heads and neurons,
and (``--bridge``) the bridge backend (TransformerLens hook points, eager attention). Each emolens
run is paired with a raw transformers run right next to it (order alternating); the ratio is the
median of the pair ratios (load on a shared CPU drifts over minutes). Raw times go to
benchmarks/results/generate.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import PROMPTS, machine, paired_ratios, plain_hf, write_json  # noqa: E402

N_NEW = 32


def main() -> None:
    import emolens
    from emolens import Pos, attn_out, head, mlp_out, neuron, resid
    from emolens.interventions import Add, Scale, Zero

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5, help="pairs for the two RESULT rows")
    ap.add_argument("--site-reps", type=int, default=3, help="pairs for the other site/op rows (0 skips them)")
    ap.add_argument("--bridge", action="store_true", help="also time the bridge backend (eager attention)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    m = emolens.load_model()
    hf = plain_hf()
    assert hf.config._attn_implementation == "sdpa", hf.config._attn_implementation
    for p in list(hf.parameters()) + list(m.hf_model.parameters()):
        p.requires_grad_(False)
    tok = m.tokenizer
    batch = m.encode(PROMPTS)
    B, L = len(PROMPTS), m.n_layers // 4
    g = torch.Generator().manual_seed(0)
    v = torch.randn(m.d_model, generator=g)
    v = v / v.norm()
    V = torch.randn(B, m.d_model, generator=g)
    V = V / V.norm(dim=-1, keepdim=True)
    variants = {
        "resid_add": [Add(resid(L), v, strength=1.0, pos=Pos.all())],
        "per_row": [Add(resid(L), V, strength=torch.linspace(0.5, 2.0, B), per_row=True, pos=Pos.all())],
        "attn_out_scale": [Scale(attn_out(L), 1.5)],
        "mlp_out_add": [Add(mlp_out(L), v, strength=0.5)],
        "heads_zero": [Zero(head(L, (0, 3)))],
        "neurons_scale": [Scale(neuron(L, tuple(range(0, m.d_mlp, 7))), 2.0)],
    }
    kw = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)

    def raw():
        out = hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None, **kw)
        assert out.shape[1] == batch.input_ids.shape[1] + N_NEW

    def ours(ivs, backend="auto"):
        def run():
            ids = m.generate(PROMPTS, interventions=ivs, batch_size=B, return_ids=True, backend=backend, **kw)
            assert len(ids) == B
        return run

    main_fns = {k: ours(variants[k]) for k in ("resid_add", "per_row")}
    site_fns = {k: ours(iv) for k, iv in variants.items() if k not in main_fns}
    if args.bridge:
        site_fns["bridge_resid_add"] = ours(variants["resid_add"], backend="bridge")
    with torch.inference_mode():
        ratios, secs = paired_ratios(raw, main_fns, repeat=args.reps)
        if args.site_reps:
            r2, s2 = paired_ratios(raw, site_fns, repeat=args.site_reps)
            ratios |= r2
            secs |= {k: v for k, v in s2.items() if k != "ref"}
    print(f"{B} chat prompts ({batch.input_ids.shape[1]} tokens padded) x {N_NEW} forced new tokens, greedy; "
          f"each emolens run paired with a raw run next to it, median of the pair ratios "
          f"({args.reps} pairs for the RESULT rows, {args.site_reps} for the others):")
    print(f"  raw transformers generate (SDPA, KV cache): {secs['ref']:.2f} s")
    for k, x in ratios.items():
        print(f"  emolens {k:18s} {secs[k]:.2f} s  ({x:.3f}x)")
    print(f"machine: {machine()}")
    res = {"steered_generate_vs_hf": round(ratios["resid_add"], 3), "per_row_steer_vs_hf": round(ratios["per_row"], 3)}
    write_json("generate", res, ratios=ratios, median_seconds=secs, prompts=B, new_tokens=N_NEW)
    print(f"RESULT steered_generate_vs_hf={ratios['resid_add']:.3f} per_row_steer_vs_hf={ratios['per_row']:.3f}")


if __name__ == "__main__":
    main()
