"""Bad input a researcher hits: each raises a clear emolens error that names the fix.

Every test asserts the error class (from :mod:`emolens.errors`) and that the message says what to
do. Grouped by where the input enters: loading a model, prompts and generation sizes, saved files,
output paths, the command line, and the model a saved vector or result belongs to.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import emolens
from emolens import cli, resid
from emolens.directions import EmotionVectors, emotion_vectors
from emolens.errors import (EmolensError, InputError, InterventionError, ModelNotFoundError, OutputPathError,
                            ResultError, SiteError)
from emolens.interventions import Add
from emolens.model import _check_dtype, model_fingerprint
from emolens.results import Result

from conftest import get_model

PAIRS = [{"emotion": "joy", "positive": "I am so happy today!", "negative": "I am here today."},
         {"emotion": "joy", "positive": "What a wonderful gift!", "negative": "What a gift."}]


# ---------------------------------------------------------------------------------------------
# loading a model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["./no/such/model-dir", "/no/such/model-dir", "~/no-such-emolens-model"])
def test_nonexistent_local_model_directory(path):
    with pytest.raises(ModelNotFoundError, match="No model directory") as e:
        emolens.load_model(path, device="cpu")
    assert "Check the path" in str(e.value) and "tiny-llama" in str(e.value)


def test_empty_directory_and_a_file_are_not_models(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json") as e:
        emolens.load_model(str(tmp_path), device="cpu")
    assert "it holds nothing" in str(e.value) and "save_pretrained" in str(e.value)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="holds weights.bin"):
        emolens.load_model(str(tmp_path), device="cpu")
    with pytest.raises(ModelNotFoundError, match="is a file, not a model directory"):
        emolens.load_model(str(tmp_path / "weights.bin"), device="cpu")


def test_device_that_is_not_here():
    if torch.cuda.is_available():
        bad, fix = f"cuda:{torch.cuda.device_count()}", "pick one of those"
    else:
        bad, fix = "cuda", "pass device='cpu'"
    with pytest.raises(InputError, match="CUDA") as e:
        emolens.load_model("tiny-llama", device=bad)
    assert fix in str(e.value)
    with pytest.raises(InputError, match="Unknown device 'gpu'") as e:
        emolens.load_model("tiny-llama", device="gpu")
    assert "pass 'cpu', 'cuda'" in str(e.value)


@pytest.mark.parametrize("dtype", ["float33", "int64", "nn", torch.int32, 3])
def test_unknown_dtype(dtype):
    with pytest.raises(InputError, match="dtype") as e:
        emolens.load_model("tiny-llama", device="cpu", dtype=dtype)
    assert "pass one of float32, bfloat16, float16" in str(e.value)


def test_dtype_names_that_are_accepted():
    assert _check_dtype("bf16") is torch.bfloat16 and _check_dtype("torch.float16") is torch.float16
    assert _check_dtype("float32") is torch.float32 and _check_dtype(torch.bfloat16) is torch.bfloat16
    assert _check_dtype(None) is None


def test_model_name_of_the_wrong_type():
    with pytest.raises(ModelNotFoundError, match="must be a string or a path"):
        emolens.load_model(42, device="cpu")


# ---------------------------------------------------------------------------------------------
# prompts and generation sizes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompts, match", [
    (None, "not NoneType"), (5, "not int"), ([None], "Prompt 0 is NoneType"), (["ok", 3], "Prompt 1 is int"),
    ([b"bytes"], "Prompt 0 is bytes"), ([], "empty"),
])
def test_none_and_non_string_prompts(tiny_llama, prompts, match):
    for call in (lambda: tiny_llama.generate(prompts, max_new_tokens=2),
                 lambda: tiny_llama.encode(prompts, chat=False),
                 lambda: emolens.capture(tiny_llama, prompts, resid(1), chat=False)):
        with pytest.raises(InputError, match=match) as e:
            call()
        assert "pass" in str(e.value)


def test_one_string_is_one_prompt_in_capture(tiny_llama):
    """capture(m, "text") used to split the string into one prompt per character."""
    one = emolens.capture(tiny_llama, "hello there", resid(1), chat=False)
    ref = emolens.capture(tiny_llama, ["hello there"], resid(1), chat=False)
    assert one.n_items == 1 and torch.equal(one[resid(1)], ref[resid(1)])
    with pytest.raises(InputError, match="batch_size=0; pass a positive integer"):
        emolens.capture(tiny_llama, ["hi"], resid(1), batch_size=0)


@pytest.mark.parametrize("value", [2.5, "8", 0, -3, True, None])
def test_max_new_tokens_must_be_a_positive_integer(tiny_llama, value):
    with pytest.raises(InputError, match="max_new_tokens") as e:
        tiny_llama.generate(["hi"], max_new_tokens=value)
    assert "positive integer" in str(e.value)


@pytest.mark.parametrize("value", [0, -1, 1.5])
def test_batch_size_must_be_a_positive_integer(tiny_llama, value):
    with pytest.raises(InputError, match="batch_size") as e:
        tiny_llama.generate(["hi"], max_new_tokens=2, batch_size=value)
    assert "positive integer" in str(e.value)


def test_valid_sizes_still_work(tiny_llama):
    import numpy as np

    out = tiny_llama.generate(["hi", "there"], max_new_tokens=np.int64(2), batch_size=1, return_ids=True)
    assert [len(r) <= 2 for r in out] == [True, True]


# ---------------------------------------------------------------------------------------------
# saved files: corrupt, or the wrong kind
# ---------------------------------------------------------------------------------------------
def _vectors(model):
    return emotion_vectors(model, PAIRS, layers=[1, 2], progress=False)


@pytest.mark.parametrize("loader", [Result.load, EmotionVectors.load])
def test_corrupt_safetensors_names_the_file(tmp_path, tiny_llama, loader):
    # garbage, and a real file cut short (as a crash mid-write without atomic saves would leave it)
    p = _vectors(tiny_llama).save(tmp_path / "vec")
    data = p.read_bytes()
    for name, blob in (("garbage", b"not a safetensors file" * 4), ("truncated", data[: len(data) // 2])):
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        (tmp_path / f"{name}.json").write_text(p.with_suffix(".json").read_text())
        with pytest.raises(ResultError, match="not a readable safetensors file") as e:
            loader(bad)
        assert str(bad) in str(e.value) and "Delete it" in str(e.value)


def test_corrupt_json_names_the_file(tmp_path):
    r = Result("layers", torch.arange(3.0), ("layer",))
    p = r.save(tmp_path / "r")
    p.with_suffix(".json").write_text("")  # a crash mid-write left an empty file
    with pytest.raises(ResultError, match="not valid JSON") as e:
        Result.load(p)
    assert str(p.with_suffix(".json")) in str(e.value) and "Delete it" in str(e.value)
    p.with_suffix(".json").unlink()
    with pytest.raises(ResultError, match="is missing"):
        Result.load(p)


def test_result_load_on_vectors_and_vectors_load_on_a_result(tmp_path, tiny_llama):
    vec = _vectors(tiny_llama).save(tmp_path / "vec")
    res = Result("layers", torch.arange(3.0), ("layer",)).save(tmp_path / "res")
    with pytest.raises(ResultError, match="holds emotion vectors, not a Result") as e:
        Result.load(vec)
    assert "EmotionVectors.load" in str(e.value)
    with pytest.raises(ResultError, match="holds a Result") as e:
        EmotionVectors.load(res)
    assert "Result.load" in str(e.value)
    with pytest.raises(ResultError, match="No saved result") as e:
        Result.load(tmp_path / "nothing")
    assert "check the path" in str(e.value)


def test_saves_are_atomic_and_tagged(tmp_path, tiny_llama):
    from safetensors import safe_open

    v = _vectors(tiny_llama)
    p = v.save(tmp_path / "vec")
    with safe_open(str(p), framework="pt") as f:
        header = f.metadata()
    assert header["format"] == "emolens.EmotionVectors" and header["model_fingerprint"] == tiny_llama.fingerprint
    assert json.loads(p.with_suffix(".json").read_text())["meta"]["model_fingerprint"] == tiny_llama.fingerprint
    r = v.norms().save(tmp_path / "norms")
    with safe_open(str(r), framework="pt") as f:
        assert f.metadata()["format"] == "emolens.Result"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["norms.json", "norms.safetensors", "vec.json",
                                                         "vec.safetensors"]  # no temp files left


# ---------------------------------------------------------------------------------------------
# output paths
# ---------------------------------------------------------------------------------------------
def test_output_path_under_a_file(tmp_path, tiny_llama):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    v = _vectors(tiny_llama)
    for save in (lambda: v.save(blocker / "vec"), lambda: v.norms().save(blocker / "sub" / "norms"),
                 lambda: v.to_gguf(blocker / "joy.gguf", "joy")):
        with pytest.raises(OutputPathError, match="is a file, not a folder") as e:
            save()
        assert str(blocker) in str(e.value) and "choose an output path" in str(e.value)
        assert isinstance(e.value, OSError) and isinstance(e.value, EmolensError)


def test_output_path_in_an_unwritable_place(tmp_path, monkeypatch):
    r = Result("layers", torch.arange(3.0), ("layer",))
    if os.geteuid() != 0:  # root writes anywhere; the simulated refusal below covers it
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(OutputPathError, match="not writable") as e:
                r.save(ro / "r")
            assert "choose an output path" in str(e.value)
        finally:
            ro.chmod(0o700)
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputPathError, match="Cannot write") as e:
        r.save(tmp_path / "r")
    assert "choose an output path in a writable folder" in str(e.value)
    with pytest.raises(OutputPathError, match="it is a folder"):
        from emolens.io import write_text

        write_text(tmp_path, "x")


def test_cli_out_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["run", "--model", "tiny-llama", "--out", str(blocker / "runs"), "--name", "r"]) == 2
    err = capsys.readouterr().err
    assert f"{blocker} is a file, not a folder" in err and "choose an output path" in err


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top", ["0", "-3", "ten"])
def test_cli_top_must_be_positive(top, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["attribute", "--model", "tiny-llama", "--clean", "a b", "--corrupted", "a c", "--target", "x",
                  "--foil", "y", "--top", top])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --top" in err and "pass a whole number >= 1" in err


def test_result_top_negative():
    r = Result("layers", torch.arange(4.0), ("layer",))
    with pytest.raises(ResultError, match="non-negative integer"):
        r.top(-1)
    with pytest.raises(ResultError, match="pass k <= 4"):
        r.top(5)
    assert r.top(0) == [] and [c["layer"] for c in r.top(2)] == [3, 2]


def test_cli_steer_bad_window_and_wrong_vectors_file(tmp_path, capsys):
    out = tmp_path / "runs"
    assert cli.main(["steer", "--model", "tiny-llama", "--window", "a,b", "--max-new-tokens", "2",
                     "--out", str(out)]) == 2
    assert "e.g. --window -3,-2,-1" in capsys.readouterr().err
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    assert cli.main(["steer", "--model", "tiny-llama", "--vectors", str(notes), "--max-new-tokens", "2",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is a .txt file, not saved emotion vectors" in err and "pass the .safetensors path" in err
    assert not out.exists() or not any(out.iterdir())  # refused before a run folder was made
    with pytest.raises(ResultError, match="not saved results"):
        Result.load(notes)


def test_cli_failure_inside_a_step_marks_the_run_folder_failed_and_resume_finishes_it(tmp_path, tiny_llama, capsys):
    # a corrupt vectors file is only read inside the run's first step: run.json must say "failed" and why (not
    # "running" forever); the same folder resumed once the file is fixed finishes and drops the error
    vec = tmp_path / "vec.safetensors"
    vec.write_bytes(b"not a safetensors file" * 4)
    args = ["steer", "--model", "tiny-llama", "--vectors", str(vec), "--layer", "1", "--max-new-tokens", "2",
            "--out", str(tmp_path), "--name", "r", "--no-progress"]
    assert cli.main(args) == 2
    assert "vec.safetensors" in capsys.readouterr().err
    state = json.loads((tmp_path / "r" / "run.json").read_text())
    assert state["status"] == "failed" and "ResultError" in state["error"] and "vec.safetensors" in state["error"]
    _vectors(tiny_llama).save(vec)  # the CLI loads tiny-llama afresh: same weights, same fingerprint
    assert cli.main([a for a in args if a not in ("--name", "r")] + ["--resume", str(tmp_path / "r")]) == 0
    state = json.loads((tmp_path / "r" / "run.json").read_text())
    assert state["status"] == "done" and "error" not in state
    assert state["steps"]["steer"]["steered"]["status"] == "computed"


def test_cli_model_errors_are_one_line(capsys):
    assert cli.main(["info", "--model", "./no/such/model-dir"]) == 2
    assert "emolens: error: No model directory" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["info", "--model", "tiny-llama", "--device", "cuda"]) == 2
        assert "pass device='cpu'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# saved vectors and results of another model of the same width
# ---------------------------------------------------------------------------------------------
def test_fingerprint_identifies_weights_not_names_or_dtype(tiny_llama):
    qwen = get_model("tiny-qwen2")
    assert (tiny_llama.d_model, tiny_llama.n_layers) == (qwen.d_model, qwen.n_layers)  # same width and depth
    fp = tiny_llama.fingerprint
    assert len(fp) == 16 and fp != qwen.fingerprint
    again = emolens.load_model("tiny-llama", device="cpu", dtype="bfloat16")
    assert again.fingerprint == fp  # another load, another dtype: same checkpoint
    p0 = next(again.hf_model.parameters())
    with torch.no_grad():
        p0[0, 0] += 1.0  # one weight changed: a fine-tune under the same name
    assert model_fingerprint(again) != fp


def test_vectors_of_another_model_are_refused(tmp_path, tiny_llama):
    qwen = get_model("tiny-qwen2")
    p = _vectors(tiny_llama).save(tmp_path / "vec")
    with pytest.raises(ResultError, match="fingerprint") as e:
        EmotionVectors.load(p, model=qwen)
    msg = str(e.value)
    assert "'tiny-llama'" in msg and "'tiny-qwen2'" in msg and "Recompute it on this model" in msg
    assert EmotionVectors.load(p, model=tiny_llama).meta["model_fingerprint"] == tiny_llama.fingerprint
    assert EmotionVectors.load(p).emotions == ["joy"]  # without model=, no check (the escape hatch)
    # same weights under another name (a local copy of a Hub model): accepted
    info = json.loads(p.with_suffix(".json").read_text())
    info["meta"]["model"] = "/models/my-copy-of-tiny-llama"
    p.with_suffix(".json").write_text(json.dumps(info))
    EmotionVectors.load(p, model=tiny_llama)


def test_results_of_another_model_are_refused(tmp_path, tiny_llama):
    qwen = get_model("tiny-qwen2")
    res = _vectors(tiny_llama).norms()
    assert res.meta["model_fingerprint"] == tiny_llama.fingerprint
    p = res.save(tmp_path / "norms")
    with pytest.raises(ResultError, match="fingerprint") as e:
        Result.load(p, model=qwen)
    assert "Recompute it on this model" in str(e.value)
    assert torch.equal(Result.load(p, model=tiny_llama).scores, res.scores)


def test_files_without_fingerprint_fall_back_to_the_name(tmp_path, tiny_llama):
    qwen = get_model("tiny-qwen2")
    old = EmotionVectors({"joy": {"resid_post.1": torch.ones(64)}}, meta={"model": "tiny-llama"})
    p = old.save(tmp_path / "old")
    with pytest.warns(UserWarning, match="recompute it for this model"):
        EmotionVectors.load(p, model=qwen)
    r = Result("layers", torch.ones(4), ("layer",), meta={"model": "tiny-llama"}).save(tmp_path / "r")
    with pytest.raises(ResultError, match="recompute it for this model"):
        Result.load(r, model=qwen)


def test_every_result_records_the_fingerprint(tiny_llama):
    from emolens import attribution, metrics, report

    att = attribution.attribute(tiny_llama, ["I feel x"], ["I feel y"], metrics.logit_diff(tiny_llama, "x", "y"),
                                nodes=["resid", "heads"], progress=False)
    vec = _vectors(tiny_llama)
    metas = {"capture": emolens.capture(tiny_llama, ["hi there"], resid(1), chat=False).meta, "vectors": vec.meta,
             "norms": vec.norms().meta, **{f"attribution {k}": r.meta for k, r in att.items()},
             "run.json": report.run_metadata(tiny_llama)}
    for what, m in metas.items():
        assert (m["model"], m["model_fingerprint"]) == ("tiny-llama", tiny_llama.fingerprint), what


def test_gguf_keeps_the_source_model_hint(tmp_path, tiny_llama):
    qwen = get_model("tiny-qwen2")
    g = _vectors(tiny_llama).to_gguf(tmp_path / "joy.gguf", "joy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = EmotionVectors.from_gguf(g, emotion="joy", model=tiny_llama)  # hint 'llama' fits: no warning
    assert v.meta["model_hint"] == "llama" and "model" not in v.meta
    with pytest.warns(UserWarning, match="made for model 'llama'") as w:
        v = EmotionVectors.from_gguf(g, emotion="joy", model=qwen)
    assert "'qwen2' model" in str(w[0].message) and "Use vectors made on this model" in str(w[0].message)
    assert v.meta["model_hint"] == "llama"
    # the hint survives a round trip through emolens's own formats
    v.save(tmp_path / "v")
    assert EmotionVectors.load(tmp_path / "v").meta["model_hint"] == "llama"
    assert EmotionVectors.load(tmp_path / "v").to_gguf(tmp_path / "again.gguf", "joy") and \
        EmotionVectors.from_gguf(tmp_path / "again.gguf").meta["model_hint"] == "llama"


# ---------------------------------------------------------------------------------------------
# other inputs a researcher gets wrong (these already raised clear errors; kept here so they stay)
# ---------------------------------------------------------------------------------------------
BAD = {
    "misspelt site": (lambda m: emolens.capture(m, ["hi"], "resid_postt.1", chat=False), SiteError,
                      "Write KIND.LAYER"),
    "hook name typo": (lambda m: emolens.capture(m, ["hi"], "blocks.1.hook_resid_pots", chat=False), SiteError,
                       "Write KIND.LAYER"),
    "layer out of range": (lambda m: emolens.capture(m, ["hi"], resid(9), chat=False), SiteError,
                           "valid layers are 0..3"),
    "vector layer out of range": (lambda m: emotion_vectors(m, PAIRS, layers=[9], progress=False), SiteError,
                                  "valid layers are 0..3"),
    "pair missing a side": (lambda m: emotion_vectors(m, [{"positive": "a", "negative": ""}], layers=[1]),
                            InputError, "Fix or drop that pair"),
    "pair of one text": (lambda m: emotion_vectors(m, [("only one",)], layers=[1]), InputError,
                         "pass dicts with 'positive' and 'negative'"),
    "no pairs": (lambda m: emotion_vectors(m, [], layers=[1]), InputError, "pass at least one"),
    "no prompts": (lambda m: emolens.capture(m, [], resid(1)), InputError, "pass at least one"),
    "NaN steering vector": (lambda m: m.generate(["hi"], max_new_tokens=2, interventions=[
        Add(resid(1), torch.full((64,), float("nan")))]), InterventionError, "check how it was computed"),
    "vector of another width": (lambda m: m.generate(["hi"], max_new_tokens=2, interventions=[
        Add(resid(1), torch.ones(32))]), InterventionError, "needs [64]"),
    "NaN stored vector": (lambda m: EmotionVectors({"joy": {"resid_post.1": torch.full((64,), float("nan"))}}),
                          InterventionError, "recompute it"),
    "prompt beyond the context": (lambda m: m.generate(["x" * 600], max_new_tokens=2), InputError,
                                  "shorten or truncate the prompt"),
    "unknown emotion": (lambda m: _vectors(m)["anger"], InputError, "have joy"),
    "strength as text": (lambda m: Add(resid(1), torch.ones(64), strength="2"), InterventionError,
                         "pass e.g. strength=2.0"),
    "vector as text": (lambda m: Add(resid(1), "joy"), InterventionError, "must be numbers"),
    "continuation None": (lambda m: m.continuation_logprobs(["a"], [None]), InputError, "pass one text per prompt"),
    "misspelt position rule": (lambda m: emolens.capture(m, ["hi"], resid(1), pos="lats"), SiteError,
                               "valid rules: all, prompt, last"),
    "head out of range": (lambda m: emolens.capture(m, ["hi"], "head.1.9"), SiteError, "valid heads are 0..3"),
}


def test_one_intervention_where_a_list_is_expected(tiny_llama):
    add = Add(resid(1), torch.ones(64), strength=3.0)
    one = tiny_llama.forward(["hi there"], interventions=add, chat=False)
    ref = tiny_llama.forward(["hi there"], interventions=[add], chat=False)
    base = tiny_llama.forward(["hi there"], chat=False)
    assert torch.equal(one, ref) and not torch.allclose(one, base)


@pytest.mark.parametrize("case", list(BAD))
def test_other_bad_inputs(tiny_llama, case):
    fn, err, fix = BAD[case]
    with pytest.raises(err) as e:
        fn(tiny_llama)
    assert fix in str(e.value)


def test_circuit_statistics_of_another_model_are_refused(tmp_path, tiny_llama):
    from emolens.circuits import (collect_sev_stats, emo_prompts, emotion_directions, neuron_scores_from_stats,
                                  sev_items)
    from emolens.circuits.directions import SEVStats

    qwen = get_model("tiny-qwen2")
    records = [{"theme": "work", "skeleton_id": "w0", "scenario": "I sent the report to my manager.",
                "event": {"positive": "She praised it.", "neutral": "She will read it.", "negative": "She hated it."}}]
    stats = collect_sev_stats(tiny_llama, emo_prompts(sev_items(records)), progress=False)
    p = stats.save(tmp_path / "stats")
    stats = SEVStats.load(p)
    assert stats.model["fingerprint"] == tiny_llama.fingerprint
    dirs = emotion_directions(stats)
    assert neuron_scores_from_stats(tiny_llama, stats, dirs, "anger").meta["model_fingerprint"] == \
        tiny_llama.fingerprint
    with pytest.raises(ResultError, match="Recompute them for this model") as e:
        neuron_scores_from_stats(qwen, stats, dirs, "anger")
    assert "'tiny-llama'" in str(e.value) and "'tiny-qwen2'" in str(e.value)
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ResultError, match="truncated or corrupt"):
        SEVStats.load(p)
