"""Capture cost and streaming memory on the embedded model.

RESULT capture_vs_forward = time(capture of resid_post + hook_z + mlp.hook_post at every layer,
                                 streaming mean over all positions, one batch)
                            / time(one plain HF forward of the same batch)         target <= 1.15
       rss_2880_vs_100    = peak RSS of a streaming mean over 2,880 prompts
                            / the same over 100 prompts (each in a fresh process)   target <= 1.10
       growth_mb_100 / growth_mb_2880 = those peaks minus the RSS right after loading the model
                            (what the capture itself adds, MB)

Both sides of x run under torch.inference_mode() with frozen weights, interleaved, median of 7;
raw timings go to benchmarks/results/capture.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import PROMPTS, interleaved, machine, peak_rss_mb, plain_hf, write_json  # noqa: E402


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

    for p in list(hf.parameters()) + list(m.hf_model.parameters()):
        p.requires_grad_(False)
    with torch.inference_mode():
        t = interleaved({"plain": plain, "capture": cap}, repeat=7)
    x = t["capture"] / t["plain"]
    print(f"batch {tuple(batch.input_ids.shape)}: plain HF forward {t['plain']*1e3:.0f} ms, "
          f"capture of {len(sites)} sites {t['capture']*1e3:.0f} ms")

    rss = {}
    for n in (100, 2880):
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(n)], capture_output=True, text=True, check=True)
        rss[n] = json.loads(out.stdout.strip().splitlines()[-1])
        rss[n]["growth_mb"] = rss[n]["peak_rss_mb"] - rss[n]["after_load_mb"]
        print(f"streaming mean over {n} prompts: peak RSS {rss[n]['peak_rss_mb']:.0f} MB, "
              f"growth over the loaded model {rss[n]['growth_mb']:.0f} MB")
    y = rss[2880]["peak_rss_mb"] / rss[100]["peak_rss_mb"]
    print(f"machine: {machine()}")
    res = {"capture_vs_forward": round(x, 3), "rss_2880_vs_100": round(y, 3),
           "growth_mb_100": round(rss[100]["growth_mb"], 1), "growth_mb_2880": round(rss[2880]["growth_mb"], 1)}
    write_json("capture", res, median_seconds=t, rss_children=rss)
    print(f"RESULT capture_vs_forward={x:.3f} rss_2880_vs_100={y:.3f} growth_mb_100={rss[100]['growth_mb']:.0f} "
          f"growth_mb_2880={rss[2880]['growth_mb']:.0f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rss-child":
        rss_child(int(sys.argv[2]))
    else:
        main()
