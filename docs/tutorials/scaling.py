# %% [markdown]
# # Scaling out
#
# The tutorials run on a 135M model on a CPU. The same code runs on 8B models on GPUs; this page
# lists the knobs: device and dtype, several GPUs, batch sizes, memory, and checkpoints so long
# runs can stop and resume.
#
# ## Devices and dtypes
#
# `load_model(name, device=..., dtype=...)`: the device defaults to CUDA when available, the dtype
# to float32 on CPU and bfloat16 on CUDA. Any Hugging Face id or local folder works:
#
# ```python
# m = emolens.load_model("meta-llama/Llama-3.1-8B-Instruct", device="cuda", dtype="bfloat16")
# ```
#
# ## Several GPUs
#
# For a model that does not fit one GPU, pass a transformers `device_map`; transformers places the
# layers before the TransformerLens bridge boots, and emolens moves inputs to the first device:
#
# ```python
# m = emolens.load_model("meta-llama/Llama-3.1-70B-Instruct", device_map="auto", dtype="bfloat16")
# ```
#
# `n_devices=` and `max_memory=` work the same way. To spread long sweeps over many GPUs or
# machines (Ray workers, one model each, with resume), see [Scaling on Ray and many GPUs](../scaling.md).
#
# ## What costs memory
#
# | Work | Memory grows with | Knob |
# |---|---|---|
# | `capture(..., reduce="mean"/"group_mean")` | sites × d_model (not the number of prompts) | `batch_size` |
# | `capture(..., reduce="none")` | prompts × sites × d_model | read fewer sites or positions |
# | `run_with_cache(..., grad=True)` | batch × positions × sites (kept for backward) | fewer sites per pass |
# | `generate(...)` | batch × (prompt + new tokens) KV cache | `batch_size` |
#
# The cells below show each knob on a small model.

# %% tags=["remove-cell"]
import os

MODEL = os.environ.get("EMOLENS_TUTORIAL_MODEL", "smollm2-135m-instruct")  # the tests use a tiny model

# %%
import time

import torch

import emolens
from emolens import capture, resid
from emolens.capture import CaptureResult
from emolens.results import Result

m = emolens.load_model(MODEL, device="cpu", dtype=torch.float32)
print(m.device, m.dtype, m.n_layers, "layers")

# %% [markdown]
# ## Batch sizes
#
# `capture` and `generate` take `batch_size`. Larger batches use the accelerator better until
# memory runs out; padding is on the left, and position rules count real tokens, so results do not
# depend on the batch size.

# %%
prompts = [f"Sentence number {i} about a quiet afternoon." for i in range(16)]
site = resid(m.n_layers // 2)
means = {}
for bs in (4, 16):
    t0 = time.perf_counter()
    means[bs] = capture(m, prompts, site, batch_size=bs, chat=False, progress=False)[site]
    print(f"batch_size={bs:2d}: {time.perf_counter() - t0:.2f} s")
print("max difference between batch sizes:", float((means[4] - means[16]).abs().max()))

# %% [markdown]
# ## Checkpoints
#
# Captures and results save as safetensors + JSON (no pickle). A long job can save each finished
# piece and skip it when restarted; `Result.load(path, model=m)` refuses a result computed on
# another model.

# %%
from pathlib import Path

ckpt = Path("checkpoints")
ckpt.mkdir(exist_ok=True)
path = ckpt / "capture_mid"
if not path.with_suffix(".safetensors").exists():
    capture(m, prompts, site, chat=False, progress=False).save(path)
restored = CaptureResult.load(path)
print("restored", restored.sites, tuple(restored[site].shape))

norms = Result("layers", torch.arange(m.n_layers, dtype=torch.float32), ("layer",), meta={"model": m.name})
norms.save(ckpt / "norms")
print(Result.load(ckpt / "norms", model=m))

# %% [markdown]
# ## Progress and quiet runs
#
# Long loops show tqdm progress bars (the notebook widget in Jupyter). `EMOLENS_PROGRESS=0` turns
# them all off, e.g. in CI logs; most functions also take `progress=False`.
#
# ## Reports from big runs
#
# `emolens run --model NAME --out runs --name my-run` writes `runs/my-run/report.html` (self-contained,
# opens offline) plus every result; `emolens report runs/my-run` re-renders the HTML from the saved
# results without touching the model. A run folder is never overwritten unless you pass `--overwrite`.
