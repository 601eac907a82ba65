# %% [markdown]
# # Quickstart
#
# Load a model, read its activations, steer a reply, and look at a result - in a few lines each.
# Everything runs offline on the embedded SmolLM2-135M-Instruct.

# %% tags=["remove-cell"]
import os

MODEL = os.environ.get("EMOLENS_TUTORIAL_MODEL", "smollm2-135m-instruct")  # the tests use a tiny model

# %% [markdown]
# ## Load a model
#
# `load_model()` with no name loads the embedded SmolLM2-135M-Instruct. Any Hugging Face id or
# local folder works too; `tiny-llama`, `tiny-qwen2` and `tiny-gemma3` are random-weight test models.

# %%
import torch

import emolens
from emolens import Pos, capture, resid
from emolens.interventions import Add, to_json

m = emolens.load_model(MODEL)
m

# %%
print(m.generate(["How was your weekend?"], max_new_tokens=20)[0])

# %% [markdown]
# ## Read activations
#
# A **site** names a place in the model (`resid(L)` is the residual stream after block `L`); a
# **position rule** names tokens (`"last"` is the last prompt token). `capture` streams over the
# prompts and keeps a mean per group, so memory does not grow with the data.

# %%
layer = m.n_layers // 4
site = resid(layer)
happy = ["I'm so happy and grateful, this is wonderful!", "What a delightful, joyful day with friends!"]
plain = ["I'm here and this is a statement.", "What a regular, ordinary day with people."]
acts = capture(m, happy + plain, site, pos="last", reduce="group_mean", groups=["joy"] * 2 + ["plain"] * 2,
               chat=False, progress=False)
joy_vector = acts[site][0] - acts[site][1]  # [d_model]
print(site, tuple(acts[site].shape), f"|v| = {joy_vector.norm():.2f}")

# %% [markdown]
# ## Steer a reply
#
# Interventions are small serialisable specs. `Add` adds `strength × vector` at a site and
# positions; it works in single forward passes and in KV-cached generation alike.

# %%
steer = Add(site, joy_vector, strength=2.0, pos=Pos.all())
print("unsteered:", m.generate(["How was your weekend?"], max_new_tokens=20)[0])
print("steered:  ", m.generate(["How was your weekend?"], max_new_tokens=20, interventions=[steer])[0])
print(to_json([steer])[:90], "...")  # interventions save and load as JSON

# %% [markdown]
# ## Results and plots
#
# Analyses return a `Result`: scores over labelled axes plus metadata. Here: the norm of the
# joy-minus-plain difference at every layer. In a notebook a `Result` displays as a plot and a
# table; `emolens.viz.plot` picks the plot for its kind.

# %%
from emolens import viz
from emolens.results import Result

sites = [resid(L) for L in range(m.n_layers)]
per_layer = capture(m, happy + plain, sites, reduce="group_mean", groups=["joy"] * 2 + ["plain"] * 2,
                    chat=False, progress=False)
norms = torch.stack([per_layer[s][0] - per_layer[s][1] for s in sites]).norm(dim=-1)
result = Result("layers", norms, ("layer",), meta={"model": m.name, "metric": "‖joy − plain‖"})
result.top(3)

# %%
viz.plot(result)

# %% [markdown]
# ## A report
#
# Sections of text, figures, tables and results render into one self-contained HTML file
# (plotly.js embedded once, no network needed). `emolens run` does this for the full pipelines.

# %%
from emolens import report
from emolens.sections import Section

sec = Section("Joy direction", text=["Norm of the joy-minus-plain difference per layer."])
sec.add_figure("norm per layer", viz.plot(result))
sec.results["joy_norms"] = result
run_dir = report.new_run_dir("runs")
path = report.write_report([report.model_info_section(m), sec], run_dir, meta=report.run_metadata(m))
print(path.name, sorted(p.name for p in run_dir.iterdir()))
