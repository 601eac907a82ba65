"""Multi-device placement options of load_model (device_map / n_devices / max_memory), checked on CPU."""

from __future__ import annotations

import pytest
import torch

import emolens
from emolens.errors import InputError, ModelNotFoundError
from emolens.model import _placement, cache_dir


def test_placement_resolution_and_errors():
    assert _placement(None, None, None) == (None, None)
    assert _placement(None, 1, None) == (None, None)
    assert _placement({"": "cpu"}, None, None) == ({"": "cpu"}, None)
    assert _placement(None, None, {"cpu": "4GiB"}) == ("auto", {"cpu": "4GiB"})  # a budget alone implies auto
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="n_devices=2 requires CUDA"):
            _placement(None, 2, None)
    with pytest.raises(InputError, match="mixes CPU/disk offload targets with a GPU"):
        _placement({"model.embed_tokens": 0, "model.layers": "cpu", "lm_head": 0}, None, None)
    with pytest.raises(ModelNotFoundError, match="apply to Hugging Face ids"):
        emolens.load_model("tiny-llama", device="cpu", n_devices=2)


@pytest.mark.integration
def test_device_map_and_max_memory_pass_through_on_cpu(smol, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = {}
    orig = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *a, **kw):
        seen.update(kw)
        return orig(cls, *a, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    path = cache_dir() / "models" / "smollm2-135m-instruct"  # the embedded model's HF folder (written by smol)
    placed = emolens.load_model(str(path), device_map={"": "cpu"}, max_memory={"cpu": "8GiB"})
    assert seen["device_map"] == {"": "cpu"} and seen["max_memory"] == {"cpu": "8GiB"}
    assert placed.device.type == "cpu"
    b = smol.encode(["Hello there, how are you?"], chat=False)
    assert torch.allclose(placed.forward(b), smol.forward(b), atol=1e-5)
