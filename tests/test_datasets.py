"""Tests for emolens.datasets and the shipped data files (fast: no model is loaded)."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources

import pytest

from emolens.datasets import (
    EMOTIONS_PLUTCHIK,
    EMOTIONS_SEV,
    HELDOUT_EVERY,
    SCHEMAS,
    SEV_VALENCES,
    load_contrastive_pairs,
    load_judge_labelled,
    load_diagnostic_tasks,
    load_openers,
    load_sev,
)
from emolens.errors import DataError, EmolensError

SEV_THEMES = {"work", "family", "health", "travel", "school", "friendship", "money", "home"}

# Explicit emotion words that must not appear in SEV scenarios or events (the emotion is
# supplied later by the prompt, so the situations themselves must not name one).
SEV_BANNED_WORDS = """
happy happier happiest happiness happily unhappy glad gladly joy joyful joyous delight
delighted cheerful elated thrilled excited exciting excitement pleased overjoyed ecstatic
angry anger angrily furious fury mad rage enraged irritated irritating annoyed annoying
annoyance livid outraged resentful frustrated frustrating frustration infuriated infuriating
sad sadness sadly sorrow sorrowful depressed depressing miserable heartbroken grief grieving
gloomy lonely upset disappointed disappointing disappointment devastated
afraid fear fearful feared scared scary frightened frightening terrified terrifying terror
panic panicked anxious anxiety worried worry worrying nervous dread dreading
disgust disgusted disgusting revolting revolted repulsive repulsed gross grossed nauseated
nauseating sickening surprise surprised surprising surprisingly shocked shocking astonished
astonishing amazed amazing stunned startled ashamed embarrassed proud jealous relieved relief
hopeful hopeless grateful thankful love loved loving hate hated
""".split()
_BANNED_RE = re.compile(r"\b(" + "|".join(SEV_BANNED_WORDS) + r")\b", re.IGNORECASE)


# The confirmation test files (benchmarks/control.py --test): not load_sev splits, loaded by path.
_CONFIRMS = {n: resources.files("emolens").joinpath("data", n)
             for n in ("sev_confirm.jsonl", "sev_confirm2.jsonl", "sev_confirm3.jsonl", "sev_confirm4.jsonl",
                       "sev_confirm5.jsonl", "sev_confirm6.jsonl")}


def _raw(name: str) -> list[dict]:
    """Read a shipped file directly (independently of the loaders)."""
    text = resources.files("emolens").joinpath("data", name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


# --------------------------------------------------------------------------------------
# shipped files: counts and schema


def test_constants():
    assert len(EMOTIONS_PLUTCHIK) == 8
    assert set(EMOTIONS_PLUTCHIK) == {"joy", "trust", "anticipation", "surprise", "anger",
                                      "fear", "sadness", "disgust"}
    assert EMOTIONS_SEV == ("anger", "sadness", "happiness", "fear", "surprise", "disgust")
    assert SEV_VALENCES == ("positive", "neutral", "negative")
    assert set(SCHEMAS) == {"contrastive_pairs", "diagnostic_tasks", "openers", "sev", "judge_labelled"}
    for spec in SCHEMAS.values():
        assert set(spec["required"]) <= set(spec["fields"])
        assert set(spec["example"]) == set(spec["fields"])


def test_schema_examples_load(tmp_path):
    """The example record of every schema is itself valid input for its loader."""
    loaders = {"contrastive_pairs": load_contrastive_pairs,
               "diagnostic_tasks": load_diagnostic_tasks, "openers": load_openers,
               "sev": load_sev, "judge_labelled": load_judge_labelled}
    for name, spec in SCHEMAS.items():
        p = tmp_path / f"{name}.jsonl"
        p.write_text(json.dumps(spec["example"]) + "\n", encoding="utf-8")
        assert loaders[name](p).num_rows == 1


def test_contrastive_pairs_counts_and_schema():
    raw = _raw("contrastive_pairs.jsonl")
    for rec in raw:
        assert set(rec) == {"id", "emotion", "positive", "negative", "split"}
        assert all(isinstance(v, str) and v.strip() for v in rec.values())
        assert re.fullmatch(rf"{rec['emotion']}-\d{{3}}", rec["id"])
    counts = Counter(r["emotion"] for r in raw)
    assert set(counts) == set(EMOTIONS_PLUTCHIK)
    assert all(n >= 64 for n in counts.values()), counts
    ds = load_contrastive_pairs()
    assert ds.num_rows == len(raw)
    assert ds.column_names == ["id", "emotion", "positive", "negative", "split"]
    assert len(set(ds["id"])) == ds.num_rows


def test_contrastive_pairs_are_minimal_pairs():
    ds = load_contrastive_pairs()
    texts = list(ds["positive"]) + list(ds["negative"])
    assert len(set(map(_norm, texts))) == len(texts), "a sentence is used twice"
    for row in ds:
        pos, neg = _words(row["positive"]), _words(row["negative"])
        assert pos != neg, row["id"]
        assert abs(len(row["positive"].split()) - len(row["negative"].split())) <= 2, row["id"]
        shared = sum((Counter(pos) & Counter(neg)).values())
        assert shared / max(len(pos), len(neg)) >= 0.4, f"{row['id']}: not a minimal pair"


def test_contrastive_pairs_split_fixed_and_disjoint():
    ds = load_contrastive_pairs()
    assert set(ds["split"]) == {"train", "heldout"}
    per_emotion = Counter()
    for row in ds:
        per_emotion[row["emotion"]] += 1
        expected = "heldout" if per_emotion[row["emotion"]] % HELDOUT_EVERY == 0 else "train"
        assert row["split"] == expected, row["id"]
    train = load_contrastive_pairs(split="train")
    held = load_contrastive_pairs(split="heldout")
    assert train.num_rows + held.num_rows == ds.num_rows
    assert 0.2 <= held.num_rows / ds.num_rows <= 0.3
    assert not set(train["id"]) & set(held["id"])
    train_texts = set(map(_norm, list(train["positive"]) + list(train["negative"])))
    held_texts = set(map(_norm, list(held["positive"]) + list(held["negative"])))
    assert not train_texts & held_texts
    for emo in EMOTIONS_PLUTCHIK:
        assert held.filter(lambda r: r["emotion"] == emo).num_rows >= 16
    # deterministic: a second load gives the same split
    assert list(load_contrastive_pairs(split="heldout")["id"]) == list(held["id"])


def test_contrastive_pairs_filters():
    ds = load_contrastive_pairs(emotions=["joy", "trust"], split="train")
    assert set(ds["emotion"]) == {"joy", "trust"}
    assert set(ds["split"]) == {"train"}
    one = load_contrastive_pairs(emotions="fear")
    assert set(one["emotion"]) == {"fear"} and one.num_rows >= 64
    # an empty selection keeps its columns
    empty = load_contrastive_pairs(emotions="joy", split="heldout").filter(lambda r: False)
    assert empty.column_names == ["id", "emotion", "positive", "negative", "split"]


def test_diagnostic_tasks_counts_and_schema():
    raw = _raw("diagnostic_tasks.jsonl")
    for rec in raw:
        assert set(rec) == {"id", "prompt", "aligned", "misaligned", "emotion"}
        assert re.fullmatch(r"diag-\d{3}", rec["id"])
    ds = load_diagnostic_tasks()
    assert ds.num_rows == len(raw) >= 48
    assert ds.column_names == ["id", "prompt", "aligned", "misaligned", "emotion"]
    assert set(ds["emotion"]) == {"joy", "trust"}
    assert min(Counter(list(ds["emotion"])).values()) >= 20
    assert len(set(map(_norm, list(ds["prompt"])))) == ds.num_rows
    for row in ds:
        la, lm = len(row["aligned"].split()), len(row["misaligned"].split())
        assert abs(la - lm) <= 4 and max(la, lm) / min(la, lm) <= 1.5, row["id"]
        assert _norm(row["aligned"]) != _norm(row["misaligned"])


def test_openers_counts_schema_and_no_overlap():
    raw = _raw("openers.jsonl")
    for rec in raw:
        assert set(rec) == {"id", "text"}
        assert re.fullmatch(r"open-\d{3}", rec["id"])
    ds = load_openers()
    assert ds.num_rows == len(raw) >= 110
    openers = [_norm(t) for t in list(ds["text"])]
    assert len(set(openers)) == len(openers), "an opener is repeated"
    diag = load_diagnostic_tasks()
    pairs = load_contrastive_pairs()
    sev = list(load_sev(split="analysis")) + list(load_sev(split="test"))
    sev += [r for p in _CONFIRMS.values() for r in load_sev(p)]
    used = set(map(_norm, list(diag["prompt"]) + list(diag["aligned"]) + list(diag["misaligned"])))
    used |= set(map(_norm, list(pairs["positive"]) + list(pairs["negative"])))
    used |= {_norm(r["scenario"]) for r in sev}
    overlap = set(openers) & used
    assert not overlap, f"openers reused from other files: {sorted(overlap)[:3]}"


@pytest.mark.parametrize("split, per_theme, tag", [("analysis", 12, "a"), ("test", 6, "t")])
def test_sev_counts_and_schema(split, per_theme, tag):
    raw = _raw(f"sev_{split}.jsonl")
    for rec in raw:
        assert set(rec) == {"theme", "scenario", "event", "skeleton_id"}
        assert set(rec["event"]) == set(SEV_VALENCES)
        assert re.fullmatch(rf"{rec['theme']}-{tag}\d{{2}}", rec["skeleton_id"])
    ds = load_sev(split=split)
    assert ds.num_rows == len(raw) == 8 * per_theme
    assert ds.column_names == ["theme", "scenario", "event", "skeleton_id"]
    assert Counter(list(ds["theme"])) == {t: per_theme for t in SEV_THEMES}
    assert len(set(ds["skeleton_id"])) == ds.num_rows
    for row in ds:
        ev = row["event"]
        assert len({_norm(ev[v]) for v in SEV_VALENCES}) == 3, row["skeleton_id"]
        # first-person scenario
        assert re.search(r"\b(I|my|our|we)\b", row["scenario"], re.IGNORECASE), row["skeleton_id"]


def test_sev_splits_disjoint():
    ana, test = load_sev(split="analysis"), load_sev(split="test")
    assert not set(map(_norm, list(ana["scenario"]))) & set(map(_norm, list(test["scenario"])))
    assert not set(ana["skeleton_id"]) & set(test["skeleton_id"])
    ana_events = {_norm(e[v]) for e in list(ana["event"]) for v in SEV_VALENCES}
    test_events = {_norm(e[v]) for e in list(test["event"]) for v in SEV_VALENCES}
    assert not ana_events & test_events


def test_banned_word_check_catches_emotion_words():
    """The word check below can fail: it flags an explicit emotion word."""
    assert _BANNED_RE.search("I was so happy when the parcel came.")
    assert _BANNED_RE.search("The team was ANGRY about it.")
    assert not _BANNED_RE.search("The manager approved the plan and made a note of it.")


@pytest.mark.parametrize("split", ["analysis", "test"])
def test_sev_has_no_explicit_emotion_words(split):
    hits = []
    for row in load_sev(split=split):
        for text in [row["scenario"], *row["event"].values()]:
            found = _BANNED_RE.findall(text)
            if found:
                hits.append((row["skeleton_id"], found, text))
    assert not hits, hits[:5]


@pytest.mark.parametrize("name,tag", list(zip(_CONFIRMS, "cdefgh")))
def test_sev_confirm_schema_words_and_disjoint(name, tag):
    raw = _raw(name)
    for rec in raw:
        assert set(rec) == {"theme", "scenario", "event", "skeleton_id"}
        assert set(rec["event"]) == set(SEV_VALENCES)
        assert re.fullmatch(rf"{rec['theme']}-{tag}\d{{2}}", rec["skeleton_id"])
    ds = load_sev(resources.files("emolens").joinpath("data", name))
    assert ds.num_rows == len(raw) == 24
    assert Counter(list(ds["theme"])) == {t: 3 for t in SEV_THEMES}
    hits = []
    for row in ds:
        ev = row["event"]
        assert len({_norm(ev[v]) for v in SEV_VALENCES}) == 3, row["skeleton_id"]
        assert re.search(r"\b(I|my|our|we)\b", row["scenario"], re.IGNORECASE), row["skeleton_id"]
        for text in [row["scenario"], *ev.values()]:
            if _BANNED_RE.findall(text):
                hits.append((row["skeleton_id"], text))
    assert not hits, hits[:5]
    shipped = list(load_sev(split="analysis")) + list(load_sev(split="test"))
    shipped += [r for n, p in _CONFIRMS.items() if n != name for r in load_sev(p)]  # every other confirmation file
    assert not {_norm(r["scenario"]) for r in ds} & {_norm(r["scenario"]) for r in shipped}
    assert not set(ds["skeleton_id"]) & {r["skeleton_id"] for r in shipped}


def test_sev_path_overrides_split(tmp_path):
    # a record as written in the original SEV files: other key naming, extra keys allowed
    rec = {"theme": "Work/Job", "scenario": "I sent the draft to the team this afternoon.",
           "event": {"positive": "They approved it.", "neutral": "They will read it Monday.",
                     "negative": "They rejected all of it."},
           "skeleton_id": "work_00", "extra": 1}
    p = tmp_path / "sev.jsonl"
    p.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    ds = load_sev(p, split="test")
    assert ds.num_rows == 1
    assert ds[0]["skeleton_id"] == "work_00"
    assert ds[0]["event"]["neutral"] == "They will read it Monday."
    assert ds.column_names == ["theme", "scenario", "event", "skeleton_id"]
    # str paths work too
    assert load_sev(str(p)).num_rows == 1


def test_optional_ids_and_default_split(tmp_path):
    p = tmp_path / "pairs.jsonl"
    lines = [{"emotion": "joy", "positive": f"I'm so glad we met {i}.",
              "negative": f"I'm aware we met {i}."} for i in range(8)]
    p.write_text("\n".join(json.dumps(r) for r in lines) + "\n", encoding="utf-8")
    ds = load_contrastive_pairs(p)
    assert list(ds["id"])[:2] == ["joy-001", "joy-002"]
    assert list(ds["split"]) == ["train"] * 3 + ["heldout"] + ["train"] * 3 + ["heldout"]
    o = tmp_path / "openers.jsonl"
    o.write_text('{"text": "Hi there"}\n\n{"text": "Any plans?"}\n', encoding="utf-8")
    assert list(load_openers(o)["id"]) == ["open-001", "open-002"]


# --------------------------------------------------------------------------------------
# bad input raises DataError with a helpful message


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join(l if isinstance(l, str) else json.dumps(l) + "\n" for l in lines),
                 encoding="utf-8")
    return p


GOOD_PAIR = {"id": "joy-001", "emotion": "joy", "positive": "I'm so glad you came.",
             "negative": "I'm aware you came.", "split": "train"}
GOOD_SEV = {"theme": "work", "scenario": "I sent the report.",
            "event": {"positive": "It was approved.", "neutral": "It was filed.",
                      "negative": "It was rejected."},
            "skeleton_id": "work-x01"}


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError) and issubclass(DataError, EmolensError)


def test_pair_missing_side(tmp_path):
    bad = {k: v for k, v in GOOD_PAIR.items() if k != "negative"} | {"id": "joy-002"}
    p = _write(tmp_path, "pairs.jsonl", [GOOD_PAIR, bad])
    with pytest.raises(DataError) as e:
        load_contrastive_pairs(p)
    msg = str(e.value)
    assert str(p) in msg and "line 2" in msg and "'negative'" in msg and "Fix:" in msg


def test_pair_unknown_emotion_lists_valid_names(tmp_path):
    p = _write(tmp_path, "pairs.jsonl", [GOOD_PAIR | {"emotion": "joyy"}])
    with pytest.raises(DataError) as e:
        load_contrastive_pairs(p)
    msg = str(e.value)
    assert "line 1" in msg and "'joyy'" in msg and str(p) in msg
    assert all(emo in msg for emo in EMOTIONS_PLUTCHIK)
    assert "Did you mean 'joy'" in msg


def test_pair_unknown_split_value(tmp_path):
    p = _write(tmp_path, "pairs.jsonl", [GOOD_PAIR | {"split": "test"}])
    with pytest.raises(DataError, match=r"line 1.*unknown split 'test'.*train, heldout"):
        load_contrastive_pairs(p)


def test_pair_identical_sides(tmp_path):
    p = _write(tmp_path, "pairs.jsonl", [GOOD_PAIR | {"negative": GOOD_PAIR["positive"]}])
    with pytest.raises(DataError, match=r"line 1.*same text.*Fix"):
        load_contrastive_pairs(p)


def test_pair_duplicate_id(tmp_path):
    p = _write(tmp_path, "pairs.jsonl", [GOOD_PAIR, GOOD_PAIR])
    with pytest.raises(DataError, match=r"line 2: duplicate id 'joy-001' \(first used on line 1\)"):
        load_contrastive_pairs(p)


def test_pair_field_wrong_type(tmp_path):
    p = _write(tmp_path, "pairs.jsonl", [GOOD_PAIR | {"positive": ["a", "b"]}])
    with pytest.raises(DataError, match=r"line 1: field 'positive' must be a string"):
        load_contrastive_pairs(p)


def test_bad_arguments():
    with pytest.raises(DataError) as e:
        load_contrastive_pairs(emotions=["joy", "happiness"])
    assert "'happiness'" in str(e.value) and "anticipation" in str(e.value)
    with pytest.raises(DataError, match="train, heldout"):
        load_contrastive_pairs(split="test")
    with pytest.raises(DataError, match="selects nothing"):
        load_contrastive_pairs(emotions=[])
    with pytest.raises(DataError, match=r"analysis, test"):
        load_sev(split="train")


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
@pytest.mark.parametrize("loader", [load_contrastive_pairs, load_diagnostic_tasks,
                                    load_openers, load_sev])
def test_empty_file(tmp_path, loader, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as e:
        loader(p)
    assert str(p) in str(e.value) and "empty" in str(e.value) and "Fix:" in str(e.value)


@pytest.mark.parametrize("loader", [load_contrastive_pairs, load_diagnostic_tasks,
                                    load_openers, load_sev])
def test_invalid_json_names_line(tmp_path, loader):
    p = _write(tmp_path, "bad.jsonl", ['{"text": "fine"}\n', "\n", "{'text': 'single quotes'}\n"])
    with pytest.raises(DataError) as e:
        loader(p)
    msg = str(e.value)
    assert str(p) in msg and "line 3" in msg and "invalid JSON" in msg and "Fix:" in msg


def test_non_object_line(tmp_path):
    p = _write(tmp_path, "openers.jsonl", ['["a", "b"]\n'])
    with pytest.raises(DataError, match=r"line 1: expected a JSON object, got list"):
        load_openers(p)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_openers(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="directory"):
        load_openers(tmp_path)


def test_not_utf8(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        load_openers(p)


def test_diagnostic_missing_and_unknown_emotion(tmp_path):
    good = {"prompt": "Hi!", "aligned": "Lovely to hear from you!",
            "misaligned": "What do you want now?", "emotion": "trust"}
    p = _write(tmp_path, "diag.jsonl", [good, {k: v for k, v in good.items() if k != "aligned"}])
    with pytest.raises(DataError, match=r"line 2: record is missing the field 'aligned'"):
        load_diagnostic_tasks(p)
    p = _write(tmp_path, "diag.jsonl", [good | {"emotion": "love"}])
    with pytest.raises(DataError, match=r"unknown emotion 'love'.*joy, trust"):
        load_diagnostic_tasks(p)
    p = _write(tmp_path, "diag.jsonl", [good | {"misaligned": good["aligned"]}])
    with pytest.raises(DataError, match="same text"):
        load_diagnostic_tasks(p)


def test_openers_missing_text(tmp_path):
    p = _write(tmp_path, "openers.jsonl", [{"id": "o1", "text": "Hello"}, {"id": "o2", "txt": "Hi"}])
    with pytest.raises(DataError) as e:
        load_openers(p)
    msg = str(e.value)
    assert "line 2" in msg and "'text'" in msg and "'txt'" in msg


def test_sev_missing_valence(tmp_path):
    bad = json.loads(json.dumps(GOOD_SEV))
    del bad["event"]["neutral"]
    bad["skeleton_id"] = "work-x02"
    p = _write(tmp_path, "sev.jsonl", [GOOD_SEV, bad])
    with pytest.raises(DataError) as e:
        load_sev(p)
    msg = str(e.value)
    assert str(p) in msg and "line 2" in msg and "'neutral'" in msg and "Fix:" in msg


def test_sev_empty_valence_and_bad_event(tmp_path):
    bad = json.loads(json.dumps(GOOD_SEV))
    bad["event"]["negative"] = "  "
    with pytest.raises(DataError, match=r"line 1.*'negative'"):
        load_sev(_write(tmp_path, "a.jsonl", [bad]))
    with pytest.raises(DataError, match=r"line 1: field 'event' must be an object"):
        load_sev(_write(tmp_path, "b.jsonl", [GOOD_SEV | {"event": "It went well."}]))
    no_event = {k: v for k, v in GOOD_SEV.items() if k != "event"}
    with pytest.raises(DataError, match=r"missing the field 'event'.*\"positive\""):
        load_sev(_write(tmp_path, "c.jsonl", [no_event]))


def test_sev_missing_skeleton_id_and_duplicates(tmp_path):
    no_id = {k: v for k, v in GOOD_SEV.items() if k != "skeleton_id"}
    with pytest.raises(DataError, match=r"line 1: record is missing the field 'skeleton_id'"):
        load_sev(_write(tmp_path, "a.jsonl", [no_id]))
    with pytest.raises(DataError, match=r"line 2: duplicate skeleton_id 'work-x01'"):
        load_sev(_write(tmp_path, "b.jsonl", [GOOD_SEV, GOOD_SEV]))


def test_user_tables_csv_parquet_and_datasets_folders_with_column_mapping(tmp_path):
    """Every loader reads CSV/parquet/HF-datasets folders too; a column mapping renames fields; nested SEV fields
    come as dotted columns; errors name the file and the CSV line (header = line 1)."""
    import datasets as hfd
    import pandas as pd

    from emolens.datasets import load_openers, load_sev

    rows = [{"topic": "t", "id": "1", "scenario": "s", "event.positive": "p", "event.neutral": "n",
             "event.negative": "q"}, {"topic": "t", "id": "2", "scenario": "s2", "event.positive": "p2",
                                      "event.neutral": "n2", "event.negative": ""}]
    csv = tmp_path / "sev.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    cols = {"theme": "topic", "skeleton_id": "id"}
    with pytest.raises(DataError, match=r"sev.csv, line 3: 'event' is missing the valence 'negative'"):
        load_sev(csv, columns=cols)
    pq = tmp_path / "sev.parquet"
    pd.DataFrame(rows[:1]).to_parquet(pq)
    want = {"theme": "t", "scenario": "s", "event": {"positive": "p", "neutral": "n", "negative": "q"},
            "skeleton_id": "1"}
    assert load_sev(pq, columns=cols)[0] == want
    with pytest.raises(DataError, match=r"sev.parquet, row 1: record is missing the field 'theme'"):
        load_sev(pq)  # without the mapping the schema field is absent
    folder = tmp_path / "ds"
    hfd.Dataset.from_pandas(pd.DataFrame(rows[:1])).save_to_disk(str(folder))
    assert load_sev(folder, columns=cols)[0] == want
    op = tmp_path / "openers.csv"
    pd.DataFrame({"line": ["Hi there!", "How are you?"]}).to_csv(op, index=False)
    assert list(load_openers(op, columns={"text": "line"})["text"]) == ["Hi there!", "How are you?"]
