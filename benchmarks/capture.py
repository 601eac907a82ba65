"""Capture cost and streaming memory on the embedded model.

RESULT capture_vs_forward = time(capture of resid_post + hook_z + mlp.hook_post at every layer,
                                 streaming mean over all positions, one batch)
                            / time(one plain HF forward of the same batch)         target <= 1.15
       rss_2880_vs_100    = peak RSS of a streaming mean over 2,880 prompts
                            / the same over 100 prompts (each in a fresh process)   target <= 1.10
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import PROMPTS, interleaved, machine, peak_rss_mb, plain_hf  # noqa: E402


def all_sites(m):
    from emolens import head, neuron, resid

    return [s for L in range(m.n_layers) for s in (resid(L), head(L), neuron(L))]


def rss_child(n: int) -> None:
    import emolens
    from emolens import capture

    m = emolens.load_model()
    prompts = [PROMPTS[i % len(PROMPTS)] + f" (note {i})" for i in range(n)]
    base = peak_rss_mb()
    capture(m, prompts, all_sites(m), pos="all", reduce="mean", batch_size=32, progress=False)
    print(json.dumps({"n": n, "peak_rss_mb": peak_rss_mb(), "after_load_mb": base}))


def main() -> None:
    import emolens
    from emolens import capture

    torch.set_grad_enabled(False)
    m = emolens.load_model()
    hf = plain_hf()
    prompts = PROMPTS * 2  # 16 prompts
    batch = m.encode(prompts)  # chat-formatted, as the pipelines run them
    sites = all_sites(m)

    def plain():
        hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)

    def cap():
        capture(m, prompts, sites, pos="all", reduce="mean", batch_size=len(prompts), progress=False)

    t = interleaved({"plain": plain, "capture": cap}, repeat=7)
    x = t["capture"] / t["plain"]
    print(f"batch {tuple(batch.input_ids.shape)}: plain HF forward {t['plain']*1e3:.0f} ms, "
          f"capture of {len(sites)} sites {t['capture']*1e3:.0f} ms")

    rss = {}
    for n in (100, 2880):
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(n)], capture_output=True, text=True, check=True)
        rss[n] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"streaming mean over {n} prompts: peak RSS {rss[n]['peak_rss_mb']:.0f} MB")
    y = rss[2880]["peak_rss_mb"] / rss[100]["peak_rss_mb"]
    print(f"machine: {machine()}")
    print(f"RESULT capture_vs_forward={x:.3f} rss_2880_vs_100={y:.3f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rss-child":
        rss_child(int(sys.argv[2]))
    else:
        main()
