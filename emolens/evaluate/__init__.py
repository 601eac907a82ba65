"""Evaluation of emotion in generated text: lexicon scorers, paired statistics, emotion judges and
a local OpenAI-compatible server.

* :mod:`.lexicon` - NRC EmoLex rates, VADER, first-person pronoun rate, distinct-n
  (``score_texts`` combines them). The NRC lexicon is research-use only; cite Mohammad & Turney
  (2013), Computational Intelligence 29(3):436-465.
* :mod:`.stats` - paired t / Wilcoxon tests, Cohen's d_z, seeded bootstrap CIs, ``results_table``.
* :mod:`.judges` - ``NRCJudge``, ``NADEJudge`` (NADE intensities relative to a neutral baseline),
  ``ProbeJudge`` (MiniLM + linear head) and ``OpenAIJudge`` (paper 2's rubric over HTTP), plus
  ``evaluate_judge``.
* :mod:`.agreement` - ``JudgeEnsemble`` (majority vote over judges), Cohen's / Fleiss' kappa,
  Wilson intervals, ``accuracy_table``.
* :mod:`.side_effects` - the side-effect card of a control result (perplexity ratio, distinct-2,
  restatement rate, emotion-name rate, task retention), ``Guards`` and the guarded selection rule.
* :mod:`.server` - ``serve(generate_fn)`` exposes any generator at ``/v1/chat/completions``.

Heavy dependencies (torch, transformers) are imported only when a ProbeJudge is used.
"""

from .judges import (
    EMOTIONS,
    Judge,
    MiniLMEncoder,
    NADEJudge,
    NRCJudge,
    OpenAIJudge,
    ProbeJudge,
    Verdict,
    evaluate_judge,
    load_labelled,
    parse_judge_reply,
)
from .lexicon import (
    NRC_CATEGORIES,
    distinct_n,
    first_person_rate,
    nrc_rates,
    score_texts,
    tokenize,
    vader_compound,
)
from .fluency import corpus_perplexity, perplexity, reply_nll
from .server import model_generate_fn, serve
from .agreement import (JudgeEnsemble, accuracy_table, cohen_kappa, cohen_kappa_ci, fleiss_kappa, intervals_overlap,
                        majority_vote, pairwise_kappa, wilson_interval)
from .stats import PairedTest, bootstrap_ci, holm, paired_test, results_table

__all__ = [
    "perplexity", "reply_nll", "corpus_perplexity",
    "EMOTIONS",
    "NRC_CATEGORIES",
    "Judge",
    "Verdict",
    "NRCJudge",
    "NADEJudge",
    "ProbeJudge",
    "OpenAIJudge",
    "MiniLMEncoder",
    "evaluate_judge",
    "load_labelled",
    "parse_judge_reply",
    "tokenize",
    "nrc_rates",
    "vader_compound",
    "first_person_rate",
    "distinct_n",
    "score_texts",
    "PairedTest",
    "paired_test",
    "bootstrap_ci",
    "holm",
    "results_table",
    "serve",
    "JudgeEnsemble", "accuracy_table", "cohen_kappa", "cohen_kappa_ci", "fleiss_kappa", "intervals_overlap",
    "majority_vote", "pairwise_kappa", "wilson_interval",
    "model_generate_fn",
]
