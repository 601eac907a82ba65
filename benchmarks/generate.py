"""Steered generation speed on the embedded model.

RESULT steered_generate_vs_hf = time(emolens greedy generation with an additive intervention
                                     at one layer, every position)
                                / time(raw transformers generate, same prompts, same forced
                                       token count)                                 target <= 1.10
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import PROMPTS, interleaved, machine, plain_hf  # noqa: E402

N_NEW = 32


def main() -> None:
    import emolens
    from emolens import Pos, resid
    from emolens.interventions import Add

    torch.set_grad_enabled(False)
    m = emolens.load_model()
    hf = plain_hf()
    tok = m.tokenizer
    batch = m.encode(PROMPTS)
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(0))
    v = v / v.norm()
    steer = [Add(resid(m.n_layers // 4), v, strength=1.0, pos=Pos.all())]
    kw = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)

    def raw():
        out = hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None, **kw)
        assert out.shape[1] == batch.input_ids.shape[1] + N_NEW

    def ours():
        ids = m.generate(PROMPTS, interventions=steer, batch_size=len(PROMPTS), return_ids=True, **kw)
        assert len(ids) == len(PROMPTS)

    t = interleaved({"hf": raw, "emolens": ours}, repeat=5)
    x = t["emolens"] / t["hf"]
    print(f"{len(PROMPTS)} prompts x {N_NEW} new tokens: transformers {t['hf']:.2f} s, "
          f"emolens steered {t['emolens']:.2f} s")
    print(f"machine: {machine()}")
    print(f"RESULT steered_generate_vs_hf={x:.3f}")


if __name__ == "__main__":
    main()
