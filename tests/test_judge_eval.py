"""The judge's held-out set as user data (``--judge-eval`` / ``Paper2Config.judge_eval``).

A bad file fails up front with a DataError naming the file, line and field; a user file (any of the
data formats, with a column mapping) replaces the packaged ``judge_eval.jsonl`` in the accuracy table
of paper 2's ``judge`` step, checked against accuracies computed by hand for a rule-based judge.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from emolens import cli
from emolens.errors import DataError
from emolens.evaluate.judges import Judge, Verdict, evaluate_judge
from emolens.evaluate.lexicon import DATA_DIR
from emolens.pipelines import paper2
from emolens.pipelines.engine import run_steps

from conftest import get_model

JUDGE_STEP = next(s for s in paper2.STEPS if s.name == "judge")


class FirstWordJudge(Judge):
    """Labels a text with its first word: accuracies on a hand-written set are known exactly."""

    def judge(self, texts, targets):
        targets = [targets] * len(texts) if isinstance(targets, str) else list(targets)
        out = []
        for t, e in zip(texts, targets):
            label = t.split()[0].strip(".,!").lower()
            out.append(Verdict(label == e, label, float(label == e)))
        return out


def _cfg(**kw):
    return paper2.Paper2Config.for_model("tiny-llama").replace(judge="nrc", **kw)


def test_bad_judge_eval_file_names_file_line_and_field(tmp_path):
    bad = tmp_path / "my_eval.jsonl"
    bad.write_text(json.dumps({"text": "Anger here.", "emotion": "anger"}) + "\n"
                   + json.dumps({"text": "No label on this line."}) + "\n")
    with pytest.raises(DataError) as e:
        paper2.check_data(_cfg(judge_eval=str(bad)))
    msg = str(e.value)
    assert "my_eval.jsonl, line 2" in msg and "'emotion'" in msg and "Fix" in msg

    csv = tmp_path / "my_eval.csv"  # header = line 1, so the third data row is line 4
    csv.write_text("sentence,label\nI am furious.,anger\nSo sad.,sadness\nWhat a day.,joyful\n")
    with pytest.raises(DataError) as e:
        paper2.check_data(_cfg(judge_eval=str(csv), judge_eval_columns={"text": "sentence", "emotion": "label"}))
    msg = str(e.value)
    assert "my_eval.csv, line 4" in msg and "'joyful'" in msg and "happiness" in msg
    # without the mapping the fields are missing: named with the columns the file has
    with pytest.raises(DataError, match=r"line 2: record is missing the field 'text' \(it has 'sentence', 'label'\)"):
        paper2.check_data(_cfg(judge_eval=str(csv)))


def test_bad_judge_eval_file_fails_the_cli_before_a_run_folder_exists(tmp_path, capsys):
    bad = tmp_path / "bad_eval.jsonl"
    bad.write_text(json.dumps({"text": "Only text."}) + "\n")
    rc = cli.main(["circuit", "--model", "tiny-llama", "--device", "cpu", "--quick", "--judge", "nrc",
                   "--judge-eval", str(bad), "--out", str(tmp_path / "runs"), "--name", "x", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "bad_eval.jsonl, line 1" in err and "'emotion'" in err
    assert not (tmp_path / "runs" / "x").exists()
    # a missing file is named too
    rc = cli.main(["circuit", "--model", "tiny-llama", "--device", "cpu", "--quick", "--judge-eval",
                   str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "runs"), "--no-progress"])
    assert rc == 2 and "--judge-eval" in capsys.readouterr().err


def test_user_eval_set_replaces_the_packaged_one_in_the_accuracy_table(tmp_path):
    m = get_model("tiny-llama")
    judge = FirstWordJudge()
    # packaged set: 192 sentences, 32 per emotion; this judge gets a sentence right only when it starts with
    # its emotion's name, which we count here independently of the step
    packaged = [json.loads(line) for line in
                (DATA_DIR / "judge_eval.jsonl").read_text().splitlines()
                if line.strip()]
    ctx = run_steps([JUDGE_STEP], m, _cfg(), tmp_path / "a", progress=False, extras={"judge": judge})
    t = ctx.load("judge_accuracy").set_index("emotion")
    assert t.loc["overall", "n"] == len(packaged) == 192
    hand = sum(r["text"].split()[0].strip(".,!").lower() == r["emotion"] for r in packaged) / len(packaged)
    assert t.loc["overall", "accuracy"] == pytest.approx(100 * hand)

    # a user CSV with its own column names: anger 1 of 2, fear 1 of 1, happiness 0 of 1 -> overall 2 of 4
    user = tmp_path / "eval.csv"
    user.write_text("sentence,label\nanger is what I feel,anger\nfear not anger,anger\nFear everywhere,fear\n"
                    "sadness today,happiness\n")
    cfg = _cfg(judge_eval=str(user), judge_eval_columns={"text": "sentence", "emotion": "label"})
    paper2.check_data(cfg)
    log = []
    ctx = run_steps([JUDGE_STEP], m, cfg, tmp_path / "a", progress=False, extras={"judge": judge},
                    on_step=log.append)
    assert log[0].status == "computed" and "data changed: judge_eval" in log[0].reason
    t = ctx.load("judge_accuracy").set_index("emotion")
    assert t["n"].to_dict() == {"anger": 2, "happiness": 1, "fear": 1, "overall": 4}
    assert t["accuracy"].to_dict() == pytest.approx({"anger": 50.0, "happiness": 0.0, "fear": 100.0,
                                                     "overall": 50.0})
    conf = ctx.load("judge_confusion").set_index("true emotion")
    assert conf.loc["happiness", "sadness"] == 1 and conf.loc["anger", "fear"] == 1
    sec = JUDGE_STEP.section(ctx)
    assert str(user) in sec.text[0] and "50.0% of 4 sentences" in sec.text[0]
    # the same file again: reused; an edited file: recomputed
    log.clear()
    run_steps([JUDGE_STEP], m, cfg, tmp_path / "a", progress=False, extras={"judge": judge}, on_step=log.append)
    assert log[0].status == "reused"
    user.write_text(user.read_text() + "happiness again,happiness\n")
    log.clear()
    ctx = run_steps([JUDGE_STEP], m, cfg, tmp_path / "a", progress=False, extras={"judge": judge},
                    on_step=log.append)
    assert log[0].status == "computed"
    assert ctx.load("judge_accuracy").set_index("emotion").loc["overall", "n"] == 5


def test_evaluate_judge_reads_parquet_and_datasets_folders(tmp_path):
    rows = pd.DataFrame({"txt": ["anger now", "fear now", "disgust!"], "emo": ["anger", "surprise", "disgust"]})
    rows.to_parquet(tmp_path / "e.parquet", index=False)
    acc, conf = evaluate_judge(FirstWordJudge(), tmp_path / "e.parquet", columns={"text": "txt", "emotion": "emo"})
    assert acc == pytest.approx(2 / 3) and conf.attrs["n"] == 3
    import datasets

    datasets.Dataset.from_pandas(rows).save_to_disk(str(tmp_path / "ds"))
    acc2, _ = evaluate_judge(FirstWordJudge(), str(tmp_path / "ds"), columns={"text": "txt", "emotion": "emo"})
    assert acc2 == acc
