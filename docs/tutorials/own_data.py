# %% [markdown]
# # Your own data: paper 2 on a SEV file you wrote
#
# Every pipeline input is a configuration field (and a command-line option) that takes a JSONL,
# CSV or parquet file, or a Hugging Face `datasets` folder, with an optional column mapping:
#
# | input | field / option | schema (required fields) |
# |---|---|---|
# | paper 2 analysis split | `analysis_data` / `--analysis-data` | SEV: `theme`, `scenario`, `event{positive, neutral, negative}`, `skeleton_id` |
# | paper 2 test split | `test_data` / `--test-data` | SEV (as above) |
# | paper 2 probe judge's training set | `judge_train` / `--judge-train` | JSONL only: `text`, `emotion` (one of the six, or `neutral`) |
# | paper 2 judge's held-out set (the accuracy table of step `judge`) | `judge_eval` / `--judge-eval` | `text`, `emotion` (one of the six) |
# | paper 1 diagnostic tasks | `tasks_data` / `--tasks-data` | `prompt`, `aligned`, `misaligned`, `emotion` |
# | paper 1 contrastive pairs | `pairs_data` / `--pairs-data` | `emotion`, `positive`, `negative` (`split` optional) |
# | paper 1 openers | `openers_data` / `--openers-data` | `text` |
#
# In CSV/parquet, nested SEV fields are columns named `event.positive`, `event.neutral`,
# `event.negative`; other column names map with `*_columns` (`--columns test:theme=topic`,
# `--columns judge_eval:text=sentence,emotion=label`).
# Files are read and checked before any work; an error names the file, the line (CSV: the file's
# line, header = 1) and the missing field. This tutorial writes a three-record SEV file, runs
# paper 2 on it in a small configuration and evaluates on a CSV version of it.

# %% tags=["remove-cell"]
import os

MODEL = os.environ.get("EMOLENS_TUTORIAL_MODEL", "smollm2-135m-instruct")  # the tests use a tiny model

# %%
import json
import tempfile
from pathlib import Path

import pandas as pd

import emolens
from emolens.pipelines.paper2 import Paper2Config, run

work = Path(tempfile.mkdtemp(prefix="emolens-own-data-"))
records = [
    {"theme": "garden", "skeleton_id": "g1", "scenario": "I planted tomatoes in the back garden in spring.",
     "event": {"positive": "This week the first ripe tomatoes were bigger than any I have bought.",
               "neutral": "This week I tied the stems to new canes and watered them.",
               "negative": "This week a frost killed every plant overnight."}},
    {"theme": "bus", "skeleton_id": "b1", "scenario": "I take the 7:40 bus to work every morning.",
     "event": {"positive": "Today the driver waited for me and wished me a good day.",
               "neutral": "Today the bus came on time and I found a seat near the back.",
               "negative": "Today the bus drove past the stop although I waved."}},
    {"theme": "letters", "skeleton_id": "l1", "scenario": "I wrote to an old school friend last month.",
     "event": {"positive": "She wrote back four pages and invited me to her wedding.",
               "neutral": "She wrote back a short note with her new address.",
               "negative": "The letter came back unopened, marked 'no longer at this address'."}},
]
sev = work / "my_sev.jsonl"
sev.write_text("\n".join(json.dumps(r) for r in records) + "\n")
# the same records as CSV with other column names, for the test split
csv = work / "my_sev.csv"
pd.DataFrame([{"topic": r["theme"], "id": r["skeleton_id"], "scenario": r["scenario"],
               **{f"event.{k}": v for k, v in r["event"].items()}} for r in records]).to_csv(csv, index=False)
print(csv.read_text().splitlines()[0])

# %% [markdown]
# A broken file fails at once, naming the file, line and field:

# %%
bad = work / "bad.jsonl"
bad.write_text(json.dumps(records[0]) + "\n" + json.dumps({"theme": "x", "scenario": "y", "skeleton_id": "z"}) + "\n")
try:
    run(emolens.load_model(MODEL), work / "bad-run", config=Paper2Config(analysis_data=str(bad)), progress=False)
except emolens.EmolensError as e:
    print(type(e).__name__, "-", e)

# %% [markdown]
# ## Run paper 2 on it
#
# A small configuration: three emotions, few tokens and samples, the NRC lexicon as the judge
# (fast; the default is the project's MiniLM probe). The steering strength and the circuit scale
# are left to **calibration** in the run (a sweep on the analysis split, picked by judge accuracy
# under a fluency guard); the report section says what was chosen and why.

# %%
m = emolens.load_model(MODEL)
cfg = Paper2Config.for_model(m).replace(
    analysis_data=str(sev), test_data=str(csv), test_columns={"theme": "topic", "skeleton_id": "id"},
    emotions=("anger", "happiness", "fear"), judge="nrc", accept_filter=False,
    curve_samples=4, curve_n_random=2, curve_ks=(0, 1, 2), curve_layers_frac=(0.5,),
    influence_samples=4, influence_alphas=(0.5,), budget_per_sublayer=4.0, min_neurons=1, min_heads=1,
    prompt_max_new_tokens=12, steer_max_new_tokens=12, circuit_max_new_tokens=12,
    steer_min_new_tokens=4, circuit_min_new_tokens=4, calib_records=1, calib_alphas=(1.0, 2.0),
    calib_scales=(1.0, 2.0), calib_max_ppl_ratio=8.0, calib_min_distinct2=0.0, gen_batch_size=16,
    retention_questions=6)
sections = run(m, work / "run", config=cfg, progress=False)
calibration = next(s for s in sections if s.title.startswith("Calibration"))
print("\n".join(calibration.text))

# %%
control = next(s for s in sections if "prompting vs steering vs circuit" in s.title)
control.tables[0][1]

# %% [markdown]
# ## Resume
#
# Every step is fingerprinted by its configuration fields, the model, the data files' content and
# its inputs. Running again reuses everything; changing one field recomputes only the steps that
# depend on it (here the circuit scale: its calibration, the circuit replies, their verdicts, the
# examples, the judge ensemble's tables, the side-effect cards and the circuit heads' attention).

# %%
log = []
run(m, work / "run", config=cfg.replace(circuit_scale=2.0), progress=False, on_step=log.append)
pd.DataFrame([{"step": e.step, "status": e.status, "why": e.reason} for e in log])

# %% [markdown]
# From the command line the same run is
#
# ```bash
# emolens circuit --quick --analysis-data my_sev.jsonl --test-data my_sev.csv \
#     --columns test:theme=topic,skeleton_id=id --name mine
# emolens circuit --quick --analysis-data my_sev.jsonl --test-data my_sev.csv \
#     --columns test:theme=topic,skeleton_id=id --resume runs/mine   # after a crash: continue
# ```
