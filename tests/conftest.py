"""Shared fixtures: tiny random-weight models (fast) and the embedded model (integration)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("EMOLENS_PROGRESS", "0")
os.environ.setdefault("EMOLENS_STRICT", "1")  # a figure that cannot be drawn fails the test
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One thread by default: on a shared 2-core machine OpenMP threads competing with other processes made
# forwards 5-20x slower; EMOLENS_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("EMOLENS_TEST_THREADS", "1")))

TINY = ("tiny-llama", "tiny-qwen2", "tiny-gemma3")
_CACHE: dict = {}


def get_model(name: str):
    """Load once per session (tests must not mutate model weights)."""
    import emolens

    if name not in _CACHE:
        _CACHE[name] = emolens.load_model(name, device="cpu")
    return _CACHE[name]


@pytest.fixture(params=TINY, scope="session")
def tiny(request):
    return get_model(request.param)


@pytest.fixture(scope="session")
def tiny_llama():
    return get_model("tiny-llama")


@pytest.fixture(scope="session")
def smol():
    return get_model("smollm2-135m-instruct")
