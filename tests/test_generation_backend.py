"""Generation on plain transformers modules (HFPlacement) vs the bridged model, and per-row steering.

Reference: the bridge path (TransformerLens hook points, eager attention), which the rest of the
suite checks against TransformerLens and hand-computed cases. The plain placement must give the
same greedy tokens and the same logits (up to SDPA-vs-eager rounding) for every site kind and op.
"""

from __future__ import annotations

import pytest
import torch

from emolens import Pos, attn_out, head, mlp_out, neuron, resid
from emolens.errors import InterventionError
from emolens.interventions import Add, HFPlacement, HookPlan, HookReader, Scale, Zero, from_json, generate, to_json

PROMPTS = ["Tell me about your weekend plans.", "Hi", "What is the capital of France and why?"]


def _rand(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _cases(m):
    L = 1
    v = _rand(m.d_model, 0) * 3
    return {
        "resid_pre/add/all": [Add(resid(L, "pre"), v, pos=Pos.all())],
        "resid_post/add/last": [Add(resid(L), v, pos=Pos.last())],
        "resid_mid/add/generated": [Add(resid(L, "mid"), v, pos=Pos.generated())],
        "resid_post/add_rms/from_last": [Add(resid(2), v, rms=True, pos=Pos.from_last())],
        "attn_out/scale": [Scale(attn_out(L), 3.0)],
        "mlp_out/zero/prompt": [Zero(mlp_out(L), pos=Pos.prompt())],
        "heads/zero": [Zero(head(L, (0, 2)))],
        "heads/add": [Add(head(2, 1), _rand(m.d_head, 1) * 4)],
        "heads/scale_per_head": [Scale(head(0), torch.tensor([2.0, 0.0, 1.0, -1.0][:m.n_heads]))],
        "neurons/zero": [Zero(neuron(L, list(range(0, m.d_mlp, 3))))],
        "neurons/add": [Add(neuron(2, (1, 5)), torch.tensor([4.0, -4.0]))],
        "neurons/scale": [Scale(neuron(0, tuple(range(0, m.d_mlp, 2))), 2.5, pos=Pos.index(0, -2))],
        "rows": [Add(resid(L), v, rows=(0, 2))],
    }


CASES = ["resid_pre/add/all", "resid_post/add/last", "resid_mid/add/generated", "resid_post/add_rms/from_last",
         "attn_out/scale", "mlp_out/zero/prompt", "heads/zero", "heads/add", "heads/scale_per_head", "neurons/zero",
         "neurons/add", "neurons/scale", "rows"]


def _forward_both(m, batch, ivs):
    plan = HookPlan(m, ivs)
    with plan.hooks(), torch.no_grad():
        ref = plan.forward(batch)
    pl = HFPlacement.of(m)
    plan = HookPlan(m, ivs)
    plan.tracker.set_batch(batch)
    with plan.hf_hooks(pl), torch.no_grad():
        got = pl.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=False).logits
    return ref, got


@pytest.mark.parametrize("case", CASES)
def test_plain_placement_matches_bridge(tiny, case):
    m = tiny
    ivs = _cases(m)[case]
    batch = m.encode(PROMPTS)
    ref, got = _forward_both(m, batch, ivs)
    real = batch.attention_mask.bool()
    assert (ref - got)[real].abs().max() < 1e-4
    with torch.no_grad():
        plain = m.forward(batch)
    if case != "resid_mid/add/generated":  # a generated-only rule does nothing in a prompt pass
        assert (plain - ref)[real].abs().max() > 1e-3  # the intervention does something
    hf = generate(m, batch, interventions=ivs, max_new_tokens=6, backend="hf")
    br = generate(m, batch, interventions=ivs, max_new_tokens=6, backend="bridge")
    assert [r.tolist() for r in hf] == [r.tolist() for r in br]


def test_auto_backend_picks_plain_and_falls_back_for_hook_readers(tiny_llama):
    m = tiny_llama
    batch = m.encode(PROMPTS[:2])
    pl = HFPlacement.of(m)
    assert pl is not None and pl.model.config._attn_implementation == "sdpa"
    # the plain tree shares the bridged model's tensors (no copy)
    assert pl.model.model.layers[0].mlp.down_proj.weight.data_ptr() == \
        m.bridge.blocks[0].mlp.out.original_component.weight.data_ptr()
    seen = []
    rd = HookReader("blocks.1.attn.hook_pattern", lambda act, tr: seen.append(act.shape))
    generate(m, batch, readers=[rd], max_new_tokens=2)  # auto: a HookReader needs the bridge
    assert seen and len(seen[0]) == 4
    with pytest.raises(InterventionError, match="backend='hf'"):
        generate(m, batch, readers=[rd], max_new_tokens=2, backend="hf")


def test_per_row_steering_equals_row_restricted_specs(tiny):
    """Per-row vectors and strengths == one rows=(i,) spec per row (the engine's existing semantics)."""
    m = tiny
    B = len(PROMPTS)
    V = torch.stack([_rand(m.d_model, 10 + i) for i in range(B)])
    s = torch.tensor([3.0, 0.0, -2.0])
    per_row = [Add(resid(1), V, strength=s, per_row=True, pos=Pos.all())]
    singles = [Add(resid(1), V[i], strength=float(s[i]), rows=(i,), pos=Pos.all()) for i in range(B)]
    batch = m.encode(PROMPTS)
    with torch.no_grad():
        a = m.forward(batch, interventions=per_row)
        b = m.forward(batch, interventions=singles)
        u = m.forward(batch)
    assert torch.allclose(a, b, atol=1e-5)
    real = batch.attention_mask.bool()
    assert (a - u)[1][real[1]].abs().max() < 1e-5  # strength 0 row: unsteered
    assert (a - u)[0][real[0]].abs().max() > 1e-2
    ref = m.generate(PROMPTS, interventions=singles, max_new_tokens=6, return_ids=True, backend="bridge")
    got = m.generate(PROMPTS, interventions=per_row, max_new_tokens=6, return_ids=True)
    assert [r.tolist() for r in got] == [r.tolist() for r in ref]
    # chunked: the per-row payload is sliced per batch_size chunk
    got2 = m.generate(PROMPTS, interventions=per_row, max_new_tokens=6, return_ids=True, batch_size=2)
    alone = [m.generate(PROMPTS[i], interventions=[Add(resid(1), V[i], strength=float(s[i]))], max_new_tokens=6,
                        return_ids=True)[0].tolist() for i in range(B)]
    assert [r.tolist() for r in got2] == alone
    # per-row strengths alone (one shared vector), and JSON round trip
    one = [Add(resid(1), V[0], strength=[1.0, 2.0, 0.5])]
    back = from_json(to_json(one))
    with torch.no_grad():
        assert torch.allclose(m.forward(batch, interventions=one), m.forward(batch, interventions=back))


def test_per_row_payload_must_match_the_batch(tiny_llama):
    m = tiny_llama
    V = torch.stack([_rand(m.d_model, i) for i in range(2)])
    with pytest.raises(InterventionError, match="per prompt"):
        m.generate(PROMPTS, interventions=[Add(resid(1), V, per_row=True)], max_new_tokens=2)
    with pytest.raises(InterventionError, match="strength"):
        Add(resid(1), V, strength=[[1.0]], per_row=True)
    with pytest.raises(InterventionError, match="2 vector rows but 3"):
        m.forward(m.encode(PROMPTS[:2]), interventions=[Add(resid(1), V, strength=[1.0, 2.0, 3.0], per_row=True)])
