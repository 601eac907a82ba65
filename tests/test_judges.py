"""Tests for emolens.evaluate.judges and emolens.evaluate.server.

The OpenAI-judge tests talk real HTTP to a real server started on 127.0.0.1 by the test; only the
text the "model" returns is scripted.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from emolens.errors import DataError, InputError, JudgeError
from emolens.evaluate import (
    EMOTIONS,
    NRCJudge,
    OpenAIJudge,
    ProbeJudge,
    Verdict,
    evaluate_judge,
    load_labelled,
    model_generate_fn,
    parse_judge_reply,
    serve,
)
from emolens.evaluate.judges import SYSTEM_PROMPT, MiniLMEncoder

DATA = Path(__file__).resolve().parent.parent / "emolens" / "data"
TRAIN = DATA / "judge_train.jsonl"
EVAL = DATA / "judge_eval.jsonl"


# ----------------------------------------------------------------------------- data files


def _records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_judge_data_schema_sizes_and_no_overlap():
    train, ev = _records(TRAIN), _records(EVAL)
    for r in train + ev:
        assert set(r) == {"text", "emotion"} and r["text"].strip()
    ctr = Counter(r["emotion"] for r in train)
    assert set(ctr) == set(EMOTIONS) | {"neutral"}
    assert min(ctr.values()) >= 40
    cev = Counter(r["emotion"] for r in ev)
    assert set(cev) == set(EMOTIONS) and min(cev.values()) >= 30
    norm = lambda s: " ".join(s.lower().split())
    assert len({norm(r["text"]) for r in train}) == len(train)
    assert len({norm(r["text"]) for r in ev}) == len(ev)
    assert not {norm(r["text"]) for r in train} & {norm(r["text"]) for r in ev}


def test_load_labelled_sources_and_errors(tmp_path):
    assert load_labelled([{"text": "hi", "emotion": "Anger"}]) == [("hi", "anger")]
    assert load_labelled([("hi", "fear")]) == [("hi", "fear")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "emotion": "anger"}\nnot json\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_labelled(bad)
    with pytest.raises(DataError, match="allowed"):
        load_labelled([{"text": "x", "emotion": "joy"}])
    with pytest.raises(DataError, match="non-empty string"):
        load_labelled([{"text": "", "emotion": "anger"}])
    with pytest.raises(InputError):
        load_labelled([])


# ----------------------------------------------------------------------------- NRC judge


def test_nrc_judge_basic_verdicts():
    j = NRCJudge()
    v = j.judge(
        ["We are so happy and delighted, laughing with love!",
         "I am furious and full of rage, I hate this.",
         "The bus stops at platform six.",
         "That was furious."],  # furious -> anger + disgust: a tie
        ["happiness", "anger", "anger", "anger"],
    )
    assert v[0].match and v[0].label == "happiness" and v[0].score > 0
    assert v[1].match and v[1].label == "anger"
    assert not v[2].match and v[2].label == "none" and v[2].score == 0
    assert not v[3].match and v[3].label == "tie"
    lenient = NRCJudge(tie_policy="lenient").judge(["That was furious."], "anger")[0]
    assert lenient.match and lenient.label == "anger"
    assert all(isinstance(x, Verdict) and x.raw is None for x in v)


def test_judge_input_validation():
    j = NRCJudge()
    with pytest.raises(InputError, match="unknown target"):
        j.judge(["x"], ["joy"])  # paper 2 says happiness
    with pytest.raises(InputError, match="one target emotion per"):
        j.judge(["x", "y"], ["anger"])
    with pytest.raises(InputError, match="no texts"):
        j.judge([], "anger")
    with pytest.raises(InputError):
        NRCJudge(tie_policy="coin")


def test_nrc_judge_accuracy_on_judge_eval(capsys):
    acc, conf = evaluate_judge(NRCJudge())
    acc_l, conf_l = evaluate_judge(NRCJudge(tie_policy="lenient"))
    with capsys.disabled():
        print(f"\nNRCJudge strict accuracy on judge_eval: {acc:.3f}\n{conf}")
        print(f"NRCJudge lenient accuracy on judge_eval: {acc_l:.3f}\n{conf_l}")
    assert list(conf.index) == list(EMOTIONS)
    assert conf.to_numpy().sum() == conf.attrs["n"] == 192
    # measured 0.323 (strict, ties are frequent) and 0.661 (lenient); chance is 1/6
    assert acc > 0.25
    assert acc_l > 0.55
    assert acc_l >= acc
    # diagonal of the confusion equals the matches
    diag = sum(conf.loc[e, e] for e in EMOTIONS)
    assert diag / conf.attrs["n"] == pytest.approx(acc)


# ----------------------------------------------------------------------------- probe judge


@pytest.fixture(scope="module")
def encoder():
    # one thread: on a busy CI box (other jobs using the cores) this is 3-4x faster than two
    return MiniLMEncoder(num_threads=1)


@pytest.fixture(scope="module")
def probe_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("emolens_cache")


@pytest.fixture(scope="module")
def probe(encoder, probe_cache):
    mp = pytest.MonkeyPatch()
    mp.setenv("EMOLENS_CACHE", str(probe_cache))
    j = ProbeJudge(encoder=encoder)
    j.judge(["warm-up"], "anger")  # fits (cache is empty) and saves to $EMOLENS_CACHE
    yield j
    mp.undo()


def test_encoder_embeddings(encoder):
    e = encoder.encode(["I am happy.", "I am so glad!", "The invoice is attached."])
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2]
    again = encoder.encode(["The invoice is attached.", "I am happy.", "I am happy."])  # memoised
    np.testing.assert_allclose(again, e[[2, 0, 0]], atol=1e-6)
    assert encoder.encode([]).shape == (0, 384)


def test_eval_is_not_a_paraphrase_of_train(encoder):
    tr = encoder.encode([t for t, _ in load_labelled(TRAIN, allowed=None)])
    ev = encoder.encode([t for t, _ in load_labelled(EVAL)])
    assert (ev @ tr.T).max() < 0.95


def test_probe_judge_accuracy_on_judge_eval(probe, capsys):
    acc, conf = evaluate_judge(probe)
    with capsys.disabled():
        print(f"\nProbeJudge accuracy on judge_eval: {acc:.3f}\n{conf}\n{conf.attrs['per_emotion_accuracy']}")
    # measured 0.896 (n=192); chance is 1/6 and the NRC judge gets 0.32-0.66
    assert acc > 0.8
    assert min(conf.attrs["per_emotion_accuracy"].values()) > 0.6


def test_probe_verdicts_and_probabilities(probe):
    v = probe.judge(["Oh no, someone is breaking into the house, I'm terrified!",
                     "Ugh, the trash smells rotten and there are maggots in it."], ["fear", "fear"])
    assert v[0].match and v[0].label == "fear" and v[0].score > 0.3
    assert not v[1].match and v[1].label == "disgust" and v[1].score < 0.3
    p = probe.predict_proba(["The meeting is at noon in room 5."])
    assert list(p.columns) == list(EMOTIONS) + ["neutral"]
    assert p.to_numpy().sum() == pytest.approx(1.0, abs=1e-5)
    assert p.iloc[0].idxmax() == "neutral"


def test_probe_cached_as_safetensors_and_json(probe, probe_cache, encoder, monkeypatch):
    monkeypatch.setenv("EMOLENS_CACHE", str(probe_cache))
    cached = probe.cache_path()
    assert cached.parent.parent == probe_cache
    assert sorted(p.name for p in cached.iterdir()) == ["probe.json", "probe.safetensors"]
    meta = json.loads((cached / "probe.json").read_text())
    assert meta["labels"] == list(EMOTIONS) + ["neutral"] and meta["n_train"] == 294
    # a fresh judge picks the head up from the cache instead of refitting
    fresh = ProbeJudge(encoder=encoder)

    def no_fit(*a, **k):
        raise AssertionError("refitted although a cached head exists")

    monkeypatch.setattr(fresh, "fit", no_fit)
    texts = ["What a lovely day!", "How dare you!"]
    np.testing.assert_allclose(fresh.predict_proba(texts).to_numpy(), probe.predict_proba(texts).to_numpy(), atol=1e-6)


def test_probe_save_load_roundtrip(probe, encoder, tmp_path):
    out = probe.save(tmp_path / "head")
    assert not list(out.glob("*.pkl")) and not list(out.glob("*.pt"))
    loaded = ProbeJudge.load(out, encoder=encoder)
    assert loaded.labels == probe.labels
    np.testing.assert_array_equal(loaded.weight, probe.weight)
    (out / "probe.json").write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(DataError, match="not an emolens ProbeJudge"):
        ProbeJudge.load(out)
    with pytest.raises(DataError, match="probe.json"):
        ProbeJudge.load(tmp_path / "missing")


def test_probe_fit_custom_data(encoder):
    j = ProbeJudge(encoder=encoder, use_cache=False).fit(
        ["I love this!", "Such a joy!", "I hate you!", "How dare they!"],
        ["happiness", "happiness", "anger", "anger"],
    )
    assert j.labels == ["anger", "happiness"]
    assert j.judge(["What a delight."], "happiness")[0].match
    with pytest.raises(InputError):
        ProbeJudge(encoder=encoder).fit(["a"], None)
    with pytest.raises(JudgeError, match="not fitted"):
        ProbeJudge(encoder=encoder).save("/tmp/never")


# ----------------------------------------------------------------------------- reply parsing


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"match": 1, "reason": "angry tone"}', True),
        ('```json\n{"match": 0, "reason": "calm"}\n```', False),
        ('Sure!\n```json\n{"match": true, "reason": "x"}\n```', True),
        ('{"match": "1"}', True),
        ('{"reason": "no match key"}', None),
        ('{"match": 2}', None),
        ('{"match": [1]}', None),
        ("The text sounds angry.", None),
        ('{"match": 1, "reason": ', None),
        ("", None),
        (None, None),
    ],
)
def test_parse_judge_reply(content, expected):
    assert parse_judge_reply(content)[0] is expected


# ----------------------------------------------------------------------------- OpenAI judge over real HTTP


class Recorder:
    """A generate_fn that records every call and returns a scripted reply."""

    def __init__(self, reply):
        self.reply = reply
        self.calls = []

    def __call__(self, messages, max_tokens, temperature):
        self.calls.append({"messages": messages, "max_tokens": max_tokens, "temperature": temperature})
        return self.reply(messages) if callable(self.reply) else self.reply


@pytest.fixture
def server():
    stops = []

    def start(fn, **kw):
        url, stop = serve(fn, **kw)
        stops.append(stop)
        return url

    yield start
    for s in stops:
        s()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_judge_good_reply_and_rubric(server):
    rec = Recorder('```json\n{"match": 1, "reason": "hostile, clipped tone"}\n```')
    url = server(rec, model_name="judge-test")
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    judge = OpenAIJudge(url, model="judge-test")
    v = judge.judge(["How dare you ignore me again!", "Get out."], ["anger", "anger"])
    assert [x.match for x in v] == [True, True]
    assert v[0].label == "anger" and v[0].score == 1.0 and "hostile" in v[0].raw
    call = rec.calls[0]
    assert call["temperature"] == pytest.approx(0.1) and call["max_tokens"] == 200
    sys_msg, user_msg = call["messages"]
    assert sys_msg["role"] == "system" and user_msg["role"] == "user"
    assert sys_msg["content"] == SYSTEM_PROMPT
    for key in ("careful rater", "STYLE", "tone/attitude, not content valence",
                "['anger', 'sadness', 'happiness', 'fear', 'surprise', 'disgust']"):
        assert key in sys_msg["content"]
    assert user_msg["content"].startswith("Target emotion: anger\nText:\nHow dare you ignore me again!")
    assert '"match" (0 or 1)' in user_msg["content"] and '"reason"' in user_msg["content"]


def test_openai_judge_no_match_and_base_url_forms(server):
    url = server(Recorder('{"match": 0, "reason": "calm"}'))
    root = url[: -len("/v1")]
    for base in (url, url + "/", root):
        v = OpenAIJudge(base, model="m").judge(["The invoice is attached."], "fear")[0]
        assert (v.match, v.label, v.score) == (False, "no_match", 0.0)


def test_openai_judge_malformed_counts_as_miss(server):
    url = server(Recorder("I think this text is rather angry, yes."))
    v = OpenAIJudge(url, model="m").judge(["I hate this!"], "anger")[0]
    assert (v.match, v.label, v.score) == (False, "malformed", 0.0)
    assert v.raw == "I think this text is rather angry, yes."
    url2 = server(Recorder('{"reason": "angry"}'))
    assert OpenAIJudge(url2, model="m").judge(["I hate this!"], "anger")[0].label == "malformed"


def test_openai_judge_server_error_counts_as_api_error(server):
    def boom(messages):
        raise RuntimeError("CUDA out of memory")

    url = server(Recorder(boom))
    v = OpenAIJudge(url, model="m").judge(["x"], "anger")[0]
    assert (v.match, v.label) == (False, "api_error") and "CUDA out of memory" in v.raw


def test_openai_judge_wrong_path_raises(server):
    url = server(Recorder('{"match": 1}'))
    with pytest.raises(JudgeError, match="HTTP 404"):
        OpenAIJudge(url + "/nope", model="m").judge(["x"], "anger")


def test_openai_judge_unreachable_raises_with_url():
    port = _free_port()  # bound and released: nothing listens there
    judge = OpenAIJudge(f"http://127.0.0.1:{port}", model="m", timeout=5)
    with pytest.raises(JudgeError) as ei:
        judge.judge(["x"], "anger")
    msg = str(ei.value)
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in msg and "base_url" in msg
    assert isinstance(ei.value, RuntimeError)


def test_openai_judge_timeout_raises(server):
    def slow(messages):
        time.sleep(1.5)
        return '{"match": 1}'

    url = server(Recorder(slow))
    with pytest.raises(JudgeError, match="timed out"):
        OpenAIJudge(url, model="m", timeout=0.3).judge(["x"], "anger")


def test_openai_judge_bad_arguments():
    with pytest.raises(InputError, match="http"):
        OpenAIJudge("localhost:8000", model="m")
    with pytest.raises(InputError, match="model"):
        OpenAIJudge("http://localhost:8000", model="")


def test_evaluate_judge_through_http_matches_backend(server):
    """Serve the NRC judge behind the rubric: target and text must survive the round trip."""
    nrc = NRCJudge()

    def rater(messages):
        user = messages[-1]["content"]
        head, rest = user.split("\nText:\n", 1)
        target = head.removeprefix("Target emotion: ").strip()
        text = rest.rsplit("\n\nDoes the STYLE", 1)[0]
        m = nrc.judge([text], target)[0].match
        return json.dumps({"match": int(m), "reason": "lexicon"})

    url = server(Recorder(rater))
    pairs = load_labelled(EVAL)[::8]  # 24 texts, all six emotions
    acc_http, conf_http = evaluate_judge(OpenAIJudge(url, model="nrc"), pairs)
    acc_nrc, _ = evaluate_judge(nrc, pairs)
    assert acc_http == pytest.approx(acc_nrc)
    assert set(conf_http.columns) <= set(EMOTIONS) | {"no_match", "malformed"}


# ----------------------------------------------------------------------------- server


def _post(url, body: bytes):
    req = urllib.request.Request(url + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_protocol(server):
    rec = Recorder("Hello there.")
    url = server(rec, model_name="tiny")
    status, body = _post(url, json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                          "max_tokens": 7, "temperature": 0}).encode())
    assert status == 200
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello there."}
    assert rec.calls[-1] == {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "temperature": 0.0}
    with urllib.request.urlopen(url + "/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny"
    status, body = _post(url, b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = _post(url, json.dumps({"messages": []}).encode())
    assert status == 400 and "messages" in body["error"]["message"]


def test_server_stop_frees_port():
    url, stop = serve(lambda m, n, t: "x")
    stop()
    stop()  # idempotent
    with pytest.raises(JudgeError):
        OpenAIJudge(url, model="m", timeout=5).judge(["x"], "anger")
    with pytest.raises(InputError):
        serve("not callable")


def test_model_generate_fn_adapter():
    class FakeModel:  # the shape of emolens.load_model(...): generate([messages], max_new_tokens=N)
        def __init__(self):
            self.seen = None

        def generate(self, batch, max_new_tokens=32, temperature=None):
            self.seen = (batch, max_new_tokens, temperature)
            return [f"reply to {batch[0][-1]['content']}"]

    m = FakeModel()
    fn = model_generate_fn(m)
    assert fn([{"role": "user", "content": "hi"}], 12, 0.1) == "reply to hi"
    assert m.seen == ([[{"role": "user", "content": "hi"}]], 12, 0.1)

    class NoTemp:
        def generate(self, batch, max_new_tokens=32):
            return ["ok"]

    assert model_generate_fn(NoTemp())([{"role": "user", "content": "hi"}], 5, 0.7) == "ok"
    with pytest.raises(InputError):
        model_generate_fn(object())


# ----------------------------------------------------------------------------- integration: the embedded model


@pytest.mark.integration
def test_openai_judge_round_trip_with_embedded_model(server):
    emolens = pytest.importorskip("emolens")
    load_model = getattr(emolens, "load_model", None)
    if load_model is None:
        pytest.skip("emolens.load_model is not available yet")
    name = os.environ.get("EMOLENS_TEST_MODEL")
    model = load_model(name) if name else load_model()
    url = server(model_generate_fn(model), model_name="emolens-embedded")
    judge = OpenAIJudge(url, model="emolens-embedded", timeout=600, max_tokens=48)
    texts = ["How dare you lie to me again!", "What a wonderful surprise, I'm so happy!"]
    verdicts = judge.judge(texts, ["anger", "happiness"])
    assert len(verdicts) == 2
    for v, target in zip(verdicts, ["anger", "happiness"]):
        # the tiny model rarely writes valid JSON: a miss labelled "malformed" is expected; whatever
        # it writes must be parsed consistently with parse_judge_reply
        assert isinstance(v.raw, str)
        match, _ = parse_judge_reply(v.raw)
        if match is None:
            assert (v.match, v.label) == (False, "malformed")
        else:
            assert v.match is match and v.label == (target if match else "no_match")


def test_nade_models_unpack_atomically_and_repair_truncated(tmp_path):
    # NADE unpacks reg_*.txt.gz in place on first use; two processes starting together read half-written files
    # ("Unknown model format"). emolens unpacks first, via temp file + rename, and rewrites truncated leftovers.
    import gzip

    from emolens.evaluate.judges import _unpack_gz_models

    body = {"a": b"tree=0\n" * 5000, "b": b"tree=1\n" * 7000}
    for k, v in body.items():
        with gzip.open(tmp_path / f"reg_{k}.txt.gz", "wb") as f:
            f.write(v)
    (tmp_path / "reg_b.txt").write_bytes(body["b"][:100])  # an interrupted earlier unpack
    written = _unpack_gz_models(tmp_path)
    assert sorted(p.name for p in written) == ["reg_a.txt", "reg_b.txt"]
    for k, v in body.items():
        assert (tmp_path / f"reg_{k}.txt").read_bytes() == v
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
    assert _unpack_gz_models(tmp_path) == []  # complete files are kept
