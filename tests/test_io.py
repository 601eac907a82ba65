"""Atomic writes: the target is either the old file or the complete new one, never a partial file."""

import json
import os

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from emolens import io


def test_writers_roundtrip_and_leave_no_temp_files(tmp_path):
    io.write_json(tmp_path / "a.json", {"x": 1})
    io.write_parquet(tmp_path / "sub" / "b.parquet", pd.DataFrame({"a": [1, 2]}))
    io.write_safetensors(tmp_path / "c.safetensors", {"t": torch.arange(3.0)}, {"model": "m"})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert pd.read_parquet(tmp_path / "sub" / "b.parquet")["a"].tolist() == [1, 2]
    assert torch.equal(load_file(tmp_path / "c.safetensors")["t"], torch.arange(3.0))
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "r.json"
    io.write_json(target, {"v": "old"})
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text('{"v": "ha')  # a half-written file
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"v": "old"}
    assert sorted(os.listdir(tmp_path)) == ["r.json"]


def test_safetensors_are_byte_deterministic_and_readable(tmp_path):
    """Same tensors and metadata (in any order) give the same bytes; the reference reader agrees."""
    from safetensors import safe_open

    t = {"b": torch.tensor([float("nan"), 1.0]), "a": torch.arange(6, dtype=torch.int64).reshape(2, 3),
         "h": torch.ones(3, dtype=torch.bfloat16), "s": torch.tensor(2.5), "e": torch.zeros(0)}
    io.write_safetensors(tmp_path / "1.safetensors", t, {"x": "1", "model": "m", "fp": "abc"})
    io.write_safetensors(tmp_path / "2.safetensors", dict(reversed(list(t.items()))), {"fp": "abc", "x": "1", "model": "m"})
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()
    back = load_file(tmp_path / "1.safetensors")
    assert set(back) == set(t)
    for k, v in t.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].nan_to_num(), v.nan_to_num())
    with safe_open(str(tmp_path / "1.safetensors"), "pt") as f:
        assert f.metadata() == {"x": "1", "model": "m", "fp": "abc"}
