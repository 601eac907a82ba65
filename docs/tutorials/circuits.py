# %% [markdown]
# # Emotion circuits (paper 2)
#
# Paper 2 asks the model to reply in an emotion ("Always reply in anger.") to emotionally neutral
# scenario-event prompts (the SEV format), and finds:
#
# 1. **context-agnostic emotion directions**: per layer, the last-prompt-token residual stream of
#    each emotion minus the mean over emotions *for the same scenario*;
# 2. **MLP neurons** that write along a direction (activation × the neuron's output projected on
#    the direction);
# 3. **attention heads** whose removal lowers the layer's projection on the direction;
# 4. a long tail: ablating the top few components removes much of the emotion signal.
#
# This tutorial builds each step from the foundation API on a small slice of the shipped SEV data.

# %% tags=["remove-cell"]
import os

MODEL = os.environ.get("EMOLENS_TUTORIAL_MODEL", "smollm2-135m-instruct")  # the tests use a tiny model

# %%
import torch

import emolens
from emolens import Pos, capture, viz
from emolens.capture import run_with_cache
from emolens.datasets import EMOTIONS_SEV, load_sev
from emolens.interventions import Zero
from emolens.results import Result, inputs_hash
from emolens.sites import Site, head, neuron

m = emolens.load_model(MODEL)
sev = load_sev(split="analysis")
records = [sev[i] for i in range(2)]  # a small slice; the pipeline uses all records
SYSTEM = "Always reply in {emotion}.\nKeep the reply to at most two sentences."
prompts, emo_of, group_of = [], [], []
for g, rec in enumerate(records):
    for e in EMOTIONS_SEV:
        prompts.append([{"role": "system", "content": SYSTEM.format(emotion=e)},
                        {"role": "user", "content": f"{rec['scenario']}\n{rec['event']['neutral']}"}])
        emo_of.append(e)
        group_of.append(g)
print(len(prompts), "prompts; first user turn:", prompts[0][1]["content"][:80], "...")

# %% [markdown]
# ## 1. Context-agnostic directions
#
# Read every layer's residual stream at t* (the last prompt token), subtract each scenario's mean
# over the six emotions, average per emotion and normalise.

# %%
layers = list(range(m.n_layers))
sites = [Site("resid_post", L) for L in layers]
acts = capture(m, prompts, sites, pos="last", reduce="none", progress=False)
h = torch.stack([acts[s] for s in sites], 1)  # [prompt, layer, d_model]
groups = torch.tensor(group_of)
delta = h.clone()
for g in groups.unique():
    delta[groups == g] -= h[groups == g].mean(0)
emo_idx = torch.tensor([EMOTIONS_SEV.index(e) for e in emo_of])
centroids = torch.stack([delta[emo_idx == i].mean(0) for i in range(len(EMOTIONS_SEV))])  # [emo, layer, d]
directions = torch.nn.functional.normalize(centroids, dim=-1)
# Separation: how far each emotion's own prompts project beyond the others', per layer.
proj = torch.einsum("nld,eld->nel", delta, directions)  # [prompt, emotion, layer]
own = torch.stack([proj[emo_idx == i, i].mean(0) for i in range(len(EMOTIONS_SEV))])
meta = {"model": m.name, "inputs_hash": inputs_hash(prompts), "method": "group-mean subtraction, t*"}
separation = Result("layers", own, ("emotion", "layer"), {"emotion": list(EMOTIONS_SEV)},
                    meta={**meta, "metric": "own projection"})
viz.layer_lines(separation)

# %%
L = max(1, round(0.7 * m.n_layers) - 1)  # a late-middle layer
cos = Result("matrix", directions[:, L] @ directions[:, L].T, ("row", "col"),
             {"row": list(EMOTIONS_SEV), "col": list(EMOTIONS_SEV)}, meta={**meta, "metric": "cosine", "layer": L})
viz.cosine_heatmap(cos)

# %% [markdown]
# ## 2. Neurons that write along the direction
#
# For a neuron at layer `L`, activation × (its output weights · direction) is its direct
# contribution to the projection of `resid_post[L]` on the direction. That product equals
# activation × ∂(projection)/∂(activation), which one backward pass gives for all neurons of a layer.
# Layers not scored here stay 0 in the heatmap.

# %%
emotion = "anger"
e = EMOTIONS_SEV.index(emotion)
rows = [i for i, x in enumerate(emo_of) if x == emotion]
batch = m.encode([prompts[i] for i in rows])
last = batch.last_prompt_index
score_layers = sorted(set(range(0, m.n_layers, max(1, m.n_layers // 8))) | {L})  # ~8 layers, to stay quick
neuron_scores = torch.zeros(m.n_layers, m.d_mlp)
for layer in score_layers:
    post, nsite = Site("resid_post", layer), Site("neuron", layer)
    _, cache = run_with_cache(m, batch, [post, nsite], grad=True)
    b = torch.arange(len(rows))
    target = (cache[post.hook_name][b, last] @ directions[e, layer]).sum()
    act = cache[nsite.hook_name]
    (grad,) = torch.autograd.grad(target, [act])
    neuron_scores[layer] = (act * grad)[b, last].detach().mean(0)
neurons = Result("neurons", neuron_scores, ("layer", "neuron"), meta={**meta, "metric": f"{emotion} projection"})
viz.neurons_heatmap(neurons, top_k=min(16, m.d_mlp))

# %% [markdown]
# ## 3. Heads, by ablation
#
# Zero one head (its `hook_z` output, per query head) and measure the drop of the same layer's
# projection at t*. One forward pass per head, here for one layer.

# %%
probe_layers = [L]  # the pipeline probes every layer


def projection(layer: int, interventions=None) -> float:
    got = capture(m, [prompts[i] for i in rows], Site("resid_post", layer), reduce="mean",
                  interventions=interventions, progress=False)
    return float(got[Site("resid_post", layer)] @ directions[e, layer])


head_scores = torch.full((m.n_layers, m.n_heads), float("nan"))
for layer in probe_layers:
    base = projection(layer)
    for hd in range(m.n_heads):
        head_scores[layer, hd] = base - projection(layer, [Zero(head(layer, hd), pos=Pos.all())])
heads = Result("heads", head_scores.nan_to_num(0.0), ("layer", "head"),
               meta={**meta, "metric": f"drop of {emotion} projection", "layers": probe_layers})
viz.heads_heatmap(heads)

# %% [markdown]
# ## 4. The long tail: ablate the top-k neurons
#
# Zero the `k` highest-scoring neurons of layer `L` and re-measure the projection. A steep drop for
# small `k` is the "few components carry much of the signal" effect.

# %%
order = neuron_scores[L].argsort(descending=True)
ks = [0, 1, 4, 16]
drops = []
base = projection(L)
for k in ks:
    ivs = [Zero(neuron(L, order[:k].tolist()), pos=Pos.all())] if k else None
    drops.append(projection(L, ivs))
curve = Result("curve", torch.tensor(drops), ("x",), {"x": ks}, meta={**meta, "metric": f"{emotion} projection"})
viz.curves({f"ablate top-k neurons at layer {L}": curve}, x_title="k", y_title=f"{emotion} projection")

# %% [markdown]
# The full pipeline (`emolens run`, or `emolens circuit`) scores every layer, measures each
# sublayer's causal influence, assembles a circuit per emotion and steers with it.
