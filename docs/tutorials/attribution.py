# %% [markdown]
# # Attribution and activation patching
#
# Which components make the model continue *"The news made me so happy that I"* with a joyful
# verb rather than an angry one? Two tools answer this:
#
# - **Activation patching** (exact, one forward pass per cell): run the *corrupted* prompt
#   (*"... so angry that I"*), paste in one clean activation, and measure how far the metric moves
#   back toward the clean run.
# - **Attribution patching** (a first-order estimate, one backward pass for everything):
#   `(a_clean − a_corrupt) · ∂metric/∂a`, evaluated on the corrupted run.
#
# Attribution patching screens thousands of components at once; activation patching verifies the
# ones that matter.

# %% tags=["remove-cell"]
import os

MODEL = os.environ.get("EMOLENS_TUTORIAL_MODEL", "smollm2-135m-instruct")  # the tests use a tiny model

# %%
import torch

import emolens
from emolens import viz
from emolens.capture import run_with_cache
from emolens.interventions import Replace
from emolens.results import Result, inputs_hash
from emolens.sites import Pos, Site

m = emolens.load_model(MODEL)
clean, corrupted = "The news made me so happy that I", "The news made me so angry that I"
bc, bx = m.encode([clean], chat=False), m.encode([corrupted], chat=False)
assert bc.input_ids.shape == bx.input_ids.shape, "patching position by position needs equal token counts"
tokens = m.to_str_tokens(bx)
print(len(tokens), "tokens:", tokens)

# %% [markdown]
# ## The metric
#
# The logit difference between a joyful and an angry answer at the last position. We compare the
# first tokens where the two answers differ.

# %%
def answer_ids(a: str, b: str) -> tuple[int, int]:
    ia = m.tokenizer(a, add_special_tokens=False)["input_ids"]
    ib = m.tokenizer(b, add_special_tokens=False)["input_ids"]
    return next((x, y) for x, y in zip(ia, ib) if x != y)


joy_id, anger_id = answer_ids(" smiled", " yelled")


def metric(logits: torch.Tensor) -> torch.Tensor:
    """logit(joyful answer) − logit(angry answer) at the last position, per row."""
    return logits[:, -1, joy_id] - logits[:, -1, anger_id]


m_clean, m_corrupt = float(metric(m.forward(bc))), float(metric(m.forward(bx)))
print(f"metric: clean {m_clean:.3f}, corrupted {m_corrupt:.3f}")

# %% [markdown]
# ## Activation patching over layers × positions
#
# One batch per layer: row `i` is the corrupted prompt with the clean residual stream pasted in at
# position `i` only (`Replace(..., pos=Pos.index(i), rows=[i])`). All patches of a layer run in a
# single forward pass. To keep this page quick we patch about ten evenly spaced layers.

# %%
layers = list(range(0, m.n_layers, max(1, m.n_layers // 10)))
sites = [Site("resid_pre", L) for L in layers]
_, clean_cache = run_with_cache(m, bc, sites)
T = len(tokens)
batch = m.encode([corrupted] * T, chat=False)
exact = torch.zeros(len(layers), T)
for j, site in enumerate(sites):
    patches = [Replace(site, clean_cache[site.hook_name], pos=Pos.index(i), rows=[i]) for i in range(T)]
    exact[j] = metric(m.forward(batch, interventions=patches)) - m_corrupt
meta = {"model": m.name, "inputs_hash": inputs_hash(clean, corrupted), "metric": "logit diff"}
patching = Result("resid_pos", exact, ("layer", "position"), {"layer": layers, "position": tokens},
                  meta={**meta, "method": "activation patching"})
viz.resid_heatmap(patching)

# %% [markdown]
# ## Attribution patching: every component from one backward pass
#
# `run_with_cache(..., grad=True)` keeps the activations in the autograd graph. One backward pass of
# the metric gives the gradient at every site; multiplying by the clean-minus-corrupted difference
# estimates each patch.

# %%
all_sites = [Site("resid_pre", L) for L in range(m.n_layers)] + [Site("head", L) for L in range(m.n_layers)]
_, clean_cache = run_with_cache(m, bc, all_sites)
logits, cache = run_with_cache(m, bx, all_sites, grad=True)
names = [s.hook_name for s in all_sites]
grads = dict(zip(names, torch.autograd.grad(metric(logits).sum(), [cache[n] for n in names])))


def estimate(name: str) -> torch.Tensor:
    return ((clean_cache[name] - cache[name].detach()) * grads[name])[0]  # [pos, ...]


atp = torch.stack([estimate(f"blocks.{L}.hook_resid_pre").sum(-1) for L in range(m.n_layers)])  # [layer, pos]
heads = torch.stack([estimate(f"blocks.{L}.attn.hook_z").sum(dim=(0, 2)) for L in range(m.n_layers)])
attribution = Result("resid_pos", atp, ("layer", "position"), {"position": tokens},
                     meta={**meta, "method": "attribution patching"})
head_scores = Result("heads", heads, ("layer", "head"), meta={**meta, "method": "attribution patching"})
corr = torch.corrcoef(torch.stack([atp[layers].flatten(), exact.flatten()]))[0, 1]
print(f"correlation of estimate and exact patching over {exact.numel()} cells: {corr:.2f}")

# %%
viz.resid_heatmap(attribution)

# %%
viz.heads_heatmap(head_scores)

# %% [markdown]
# ## Look at the top heads
#
# `head_patterns` reads the attention patterns of chosen heads; the widget is circuitsvis, rendered
# offline (its JavaScript is embedded, not fetched).

# %%
top = [(c["layer"], c["head"]) for c in head_scores.top(3)]
print("top heads:", top)
viz.head_patterns(m, corrupted, top, chat=False)
