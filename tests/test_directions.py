"""Emotion vectors: planted directions, an independent activation reference, quality, files (safetensors, GGUF)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from emolens import InputError, InterventionError, ResultError, SiteError
from emolens.directions import (EmotionVectors, auroc, emotion_vectors, evaluate_vectors, mean_difference,
                                pair_activations, pca_direction, read_pairs, separation)
from emolens.sites import resid

PAIRS = [
    {"id": "j1", "emotion": "joy", "positive": "I am so happy today!", "negative": "I am here today."},
    {"id": "j2", "emotion": "joy", "positive": "What a wonderful gift.", "negative": "What a plain gift."},
    {"id": "j3", "emotion": "joy", "positive": "We laughed all night.", "negative": "We talked all night."},
    {"id": "t1", "emotion": "trust", "positive": "I trust you fully.", "negative": "I doubt you fully."},
    {"id": "t2", "emotion": "trust", "positive": "You can rely on me.", "negative": "You can't rely on me."},
]



def _planted(n=64, d=48, seed=0, scale_spread=True):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    base = torch.randn(n, d, generator=g) * 3.0  # shared content, cancels within a pair
    c = (1.0 + 2.0 * torch.rand(n, generator=g)) if scale_spread else torch.full((n,), 2.0)
    pos = base + c[:, None] * u * 4.0 + 0.2 * torch.randn(n, d, generator=g)
    neg = base + 0.2 * torch.randn(n, d, generator=g)
    return pos, neg, u


# -- synthetic: planted directions ---------------------------------------------------------------
def test_mean_difference_recovers_planted_direction():
    pos, neg, u = _planted()
    v = mean_difference(pos, neg)
    assert torch.nn.functional.cosine_similarity(v, u, dim=0) >= 0.99
    # unnormalised: the mean planted shift is 4 * E[c] = 8
    assert abs(float(v @ u) - 4.0 * 2.0) < 0.6


@pytest.mark.parametrize("center", [False, True])
def test_pca_recovers_planted_direction_oriented_and_scaled(center):
    pos, neg, u = _planted()
    v = pca_direction(pos, neg, center=center)
    cos = float(torch.nn.functional.cosine_similarity(v, u, dim=0))
    assert cos >= 0.99  # also checks the sign: positive side projects higher
    # scaled to the mean projection of the differences, like the mean difference
    d = pos - neg
    assert math.isclose(float(v.norm()), float((d @ (v / v.norm())).mean()), rel_tol=1e-4)
    # swapping sides flips the vector
    assert float(torch.nn.functional.cosine_similarity(pca_direction(neg, pos, center=center), u, dim=0)) <= -0.99


def test_auroc_and_separation_hand_computed():
    assert auroc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert auroc([1.0, 2.0], [3.0, 4.0]) == 0.0
    # 3>2 wins, 2=2 ties (½), 2<5 and 3<5 lose: (1 + 0.5) / 4
    assert auroc([2.0, 3.0], [2.0, 5.0]) == pytest.approx(0.375)
    pos, neg, u = _planted()
    s = separation(u, pos, neg)
    # unpaired AUROC is limited by the shared content (SD 3 along u vs a shift of ~8); pairs are perfect
    assert s["auroc"] > 0.9 and s["pair_accuracy"] == 1.0 and s["cohens_d"] > 1.5
    s_rand = separation(torch.randn(u.shape[0], generator=torch.Generator().manual_seed(5)), pos, neg)
    assert s_rand["auroc"] < s["auroc"]


# -- pairs -------------------------------------------------------------------------------------------
def test_read_pairs_normalises_and_rejects_missing_sides():
    ps = read_pairs([("I love it", "I see it")], emotion="joy")
    assert ps[0].emotion == "joy" and ps[0].positive == "I love it"
    with pytest.raises(InputError, match="j9.*negative"):
        read_pairs([{"id": "j9", "emotion": "joy", "positive": "Yay!", "negative": ""}])
    with pytest.raises(InputError, match="positive"):
        read_pairs([{"id": "j8", "negative": "meh"}])
    with pytest.raises(InputError, match="empty"):
        read_pairs([])
    with pytest.raises(InputError):
        read_pairs([42])


# -- on a model: independent reference --------------------------------------------------------------
def _hf_last_token_resid_post(m, text: str, layer: int) -> torch.Tensor:
    """Reference without emolens hooks: HF hidden_states[L + 1] is block L's output (L < n_layers - 1)."""
    ids = m.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = m.hf_model(input_ids=ids, output_hidden_states=True)
    return out.hidden_states[layer + 1][0, -1].float()


def test_emotion_vectors_match_independent_reference(tiny_llama):
    m = tiny_llama
    layers = [0, 1, 2]  # hidden_states[-1] is after the final norm, so the last layer is not compared
    vecs = emotion_vectors(m, PAIRS, layers=layers, progress=False)
    assert vecs.emotions == ["joy", "trust"]
    for e in ("joy", "trust"):
        sub = [p for p in PAIRS if p["emotion"] == e]
        for L in layers:
            ref = (torch.stack([_hf_last_token_resid_post(m, p["positive"], L) for p in sub]).mean(0)
                   - torch.stack([_hf_last_token_resid_post(m, p["negative"], L) for p in sub]).mean(0))
            torch.testing.assert_close(vecs.get(e, resid(L)), ref, atol=1e-4, rtol=1e-4)
    assert vecs.stats[resid(1).hook_name]["norm_median"] > 0
    assert vecs.meta["n_pairs"] == {"joy": 3, "trust": 2}


def test_pca_and_mean_token_reduce_and_quality(tiny_llama):
    m = tiny_llama
    v_pca = emotion_vectors(m, PAIRS, layers=[1], method="pca", progress=False)
    v_md = emotion_vectors(m, PAIRS, layers=[1], progress=False)
    assert v_pca.get("joy", resid(1)).shape == (m.d_model,)
    # the PCA vector is oriented like the mean difference
    assert float(torch.nn.functional.cosine_similarity(v_pca.get("joy", resid(1)), v_md.get("joy", resid(1)), dim=0)) > 0
    v_mean = emotion_vectors(m, PAIRS, layers=[1], token_reduce="mean", progress=False)
    assert not torch.allclose(v_mean.get("joy", resid(1)), v_md.get("joy", resid(1)))
    q = evaluate_vectors(m, v_md, PAIRS, progress=False)
    assert set(q.columns) >= {"emotion", "site", "auroc", "cohens_d", "pair_accuracy"}
    assert len(q) == 2 and v_md.quality["joy"][resid(1).hook_name]["n_pos"] == 3
    # pair activations: shapes and sides
    pos, neg, plist = pair_activations(m, PAIRS, [resid(0)], progress=False)
    assert pos["resid_post.0"].shape == (5, m.d_model) and len(plist) == 5


# -- container: bad input, persistence ----------------------------------------------------------------
def test_container_rejects_wrong_width_and_nan(tiny_llama):
    with pytest.raises(InterventionError, match="NaN"):
        EmotionVectors({"joy": {"resid_post.1": torch.tensor([1.0, float("nan")])}})
    v = EmotionVectors({"joy": {"resid_post.1": torch.ones(10)}})
    with pytest.raises(InterventionError, match="width 10.*d_model = 64"):
        v.check(tiny_llama)
    with pytest.raises(InterventionError, match="width"):
        v.set("joy", "resid_post.2", torch.ones(11))
    with pytest.raises(SiteError, match="No 'joy' vector at resid_post.3"):
        v.get("joy", "resid_post.3")
    with pytest.raises(InputError):
        v.get("anger", "resid_post.1")


def test_save_load_round_trip(tmp_path, tiny_llama):
    vecs = emotion_vectors(tiny_llama, PAIRS, layers=[0, 2], progress=False).combine(["joy", "trust"], "joy_trust")
    p = vecs.save(tmp_path / "vecs")
    back = EmotionVectors.load(p, model=tiny_llama)
    assert back.emotions == vecs.emotions
    for e in vecs.emotions:
        for s in vecs.sites(e):
            assert torch.equal(back.get(e, s), vecs.get(e, s))
    assert back.stats == vecs.stats and back.meta["method"] == "mean_diff"
    jt = vecs.get("joy_trust", resid(2))
    torch.testing.assert_close(jt, (vecs.get("joy", resid(2)) + vecs.get("trust", resid(2))) / 2)
    assert vecs.norms().shape == (3, 2)
    assert vecs.cosine_by_layer("joy", "trust").shape == (2,)
    cm = vecs.cosine_matrix(site=resid(2))
    assert torch.allclose(torch.diagonal(cm.scores), torch.ones(3), atol=1e-5)


# -- GGUF ------------------------------------------------------------------------------------------
def test_gguf_round_trip_is_exact_and_follows_llamacpp_layout(tmp_path):
    import gguf

    g = torch.Generator().manual_seed(0)
    vecs = EmotionVectors({"joy": {"resid_post.3": torch.randn(32, generator=g),
                                   "resid_pre.6": torch.randn(32, generator=g)}},
                          meta={"model_type": "llama"})
    p = vecs.to_gguf(tmp_path / "joy.gguf", "joy")
    # independent read of the file with the gguf package
    r = gguf.GGUFReader(str(p))
    arch = r.get_field("general.architecture")
    assert bytes(arch.parts[-1]).decode() == "controlvector"
    assert bytes(r.get_field("controlvector.model_hint").parts[-1]).decode() == "llama"
    assert int(r.get_field("controlvector.layer_count").parts[-1][0]) == 2
    names = {t.name: t for t in r.tensors}
    assert set(names) == {"direction.3", "direction.5"}  # resid_pre.6 == resid_post.5 == llama.cpp direction.5
    assert names["direction.3"].data.dtype == np.float32 and names["direction.3"].data.shape == (32,)
    assert np.array_equal(names["direction.5"].data, vecs.get("joy", "resid_pre.6").numpy())
    # round trip: bit-exact, read back at resid_post
    back = EmotionVectors.from_gguf(p, emotion="joy")
    assert torch.equal(back.get("joy", "resid_post.3"), vecs.get("joy", "resid_post.3"))
    assert torch.equal(back.get("joy", "resid_post.5"), vecs.get("joy", "resid_pre.6"))
    assert back.meta["model_type"] == "llama"
    back_pre = EmotionVectors.from_gguf(p, emotion="joy", kind="resid_pre")
    assert torch.equal(back_pre.get("joy", "resid_pre.6"), vecs.get("joy", "resid_pre.6"))


def test_gguf_reads_a_repeng_style_file_and_rejects_bad_ones(tmp_path, tiny_llama):
    import gguf

    # written exactly as repeng's ControlVector.export_gguf does
    p = tmp_path / "repeng.gguf"
    w = gguf.GGUFWriter(str(p), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 2)
    d1, d2 = np.arange(64, dtype=np.float32), -np.arange(64, dtype=np.float32)
    w.add_tensor("direction.1", d1)
    w.add_tensor("direction.2", d2)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    v = EmotionVectors.from_gguf(p, emotion="calm", model=tiny_llama)
    assert torch.equal(v.get("calm", "resid_post.2"), torch.from_numpy(d2))
    # wrong width for the model
    with pytest.raises(InterventionError, match="width"):
        EmotionVectors.from_gguf(p, model=type("M", (), {"d_model": 10, "n_layers": 4, "name": "m", "n_heads": 4,
                                                         "d_mlp": 8, "n_kv_heads": 2})())
    # not a control vector
    q = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(q), "llama")
    w.add_tensor("x", d1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ResultError, match="not a control vector"):
        EmotionVectors.from_gguf(q)
    # resid_pre.0 has no GGUF slot; non-residual sites neither
    with pytest.raises(InputError, match="resid_pre.0"):
        EmotionVectors({"joy": {"resid_pre.0": torch.ones(4)}}).to_gguf(tmp_path / "x.gguf")
    with pytest.raises(InputError, match="residual"):
        EmotionVectors({"joy": {"mlp_out.1": torch.ones(4)}}).to_gguf(tmp_path / "x.gguf")
    with pytest.warns(UserWarning, match="direction.0"):
        EmotionVectors({"joy": {"resid_post.0": torch.ones(4)}}).to_gguf(tmp_path / "x.gguf")
