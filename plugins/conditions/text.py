"""A caption as condition tokens: a frozen text encoder, a trainable projection, padding masked out.

The encoder is a Hugging Face ``transformers`` model: CLIP's text transformer or T5's encoder, loaded from a local
folder (``path``; nothing downloads) with the tokenizer beside it, or built small from a config
(``config``: ``TinyTextEncoder``) with frozen random weights and a built-in hashed word tokenizer. Either way
the encoder is frozen: it runs without gradients, stays in eval mode, and lives outside the module tree, so it
is not in ``state_dict`` (a checkpoint stores only what is trained: the projection), not among the parameters
the optimizer or the EMA see, and shared by the EMA copy. A checkpoint stores the encoder's features of a fixed
probe prompt instead, so a run loaded with another encoder (a path that now holds other weights) is refused.

Each prompt becomes its encoder's per-token features (B, T, E) with a mask of its real tokens (B, T); a
LayerNorm and a linear map take them to the backbone's width (B, T, W), and the mask goes with them (MAR masks
the padded buffer slots out of attention). The null condition -- classifier-free guidance's unconditional
branch, and a caption dropped in training -- is the empty prompt's encoding ("" still has the tokenizer's
begin / end tokens), as in Stable Diffusion's pipelines (diffusers: the negative prompt defaults to "").

A latent cache (``sandbox cache``) can store each caption's features (``cached``), padded to ``max_length``;
training from it runs no encoder.

Needs the optional extra: ``pip install -e ".[text]"`` (transformers). This module imports without it.

References:
    Fan et al., "Fluid: Scaling Autoregressive Text-to-image Generative Models with Continuous Tokens", ICLR 2025
    (arXiv 2410.13863), Fig. 3: a frozen T5 encoder and a trainable text aligner condition a random-order MAR on
    continuous tokens (by cross-attention; here the tokens fill MAR's buffer).
    Radford et al. 2021 (CLIP's text transformer); Raffel et al. 2020 (T5's encoder).
    Weinberger et al., "Feature Hashing for Large Scale Multitask Learning", ICML 2009 (hashed word ids).
"""
from __future__ import annotations

import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from sandbox.core.contracts import Condition, ConditionTokens
from sandbox.errors import UserError

PROBE = "a probe prompt: the digit 7 beside a red circle, 2 cats and one word"  # fingerprints the encoder
EXAMPLE_WORDS = ("a", "the", "handwritten", "digit", "seven", "small", "photo", "of", "3", "red", "cat", "two")


def require_transformers():
    """The ``transformers`` module, or one error line saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise UserError("TextCondition needs the transformers package, an optional extra: "
                        'pip install -e ".[text]"') from None
    return transformers


# --------------------------------------------------------------------------------------
# The config-built encoder and its tokenizer
# --------------------------------------------------------------------------------------
@dataclass
class TinyTextEncoder:
    """A small text encoder built from a config: Hugging Face's CLIP text transformer or T5 encoder at a few
    layers, with frozen random weights drawn from ``seed`` (no weight file, nothing downloads), read through the
    built-in hashed word tokenizer. A stand-in for a pretrained encoder: the projection and the backbone learn
    to read its features."""

    architecture: Literal["clip", "t5"] = "t5"  # T5's bidirectional encoder (Fluid's) or CLIP's causal transformer;
    # with random weights, T5 read the digit of held-out caption templates more reliably in a probe here
    hidden_size: int = 64  # E: as wide as the quickstart's tokens need; CLIP ViT-L/14's text model is 768
    num_layers: int = 2  # a few layers mix a word with its neighbours; CLIP's text model has 12
    num_heads: int = 2
    intermediate_size: int = 256  # 4 x hidden_size, as CLIP's and T5's MLPs
    vocab_size: int = 16384  # hashed word ids: no vocabulary to build; two of n words share an id with chance
    # ~n^2 / (2 x 16384), and the 55 words of the digit captions share none (tests/test_conditions.py checks)
    seed: int = 0  # the random weights come from their own generator: a run's seed does not change the encoder,
    # so a latent cache of its features fits every seed

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TinyTextEncoder {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"TinyTextEncoder hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                             f"({self.num_heads})")
        if self.vocab_size < 16:
            raise ValueError(f"TinyTextEncoder vocab_size must be >= 16, got {self.vocab_size}")
        if self.architecture not in ("clip", "t5"):
            raise ValueError(f"TinyTextEncoder architecture must be clip or t5, got {self.architecture!r}")


class HashedWordTokenizer:
    """Lower-cased words and single punctuation marks -> ids by a fixed hash (CRC-32, the same on every machine
    and process): no vocabulary to build from the captions, and a word never seen in training still gets its own
    id (different words collide with probability ~1/vocab_size). Each prompt is [BOS, words..., EOS], cut to
    ``max_length`` tokens (EOS kept), padded with PAD; the empty prompt is [BOS, EOS]."""

    PAD, BOS, EOS = 0, 1, 2
    SPECIAL = 3

    def __init__(self, vocab_size: int, max_length: int):
        self.vocab_size, self.max_length = int(vocab_size), int(max_length)

    def word_id(self, word: str) -> int:
        return self.SPECIAL + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - self.SPECIAL)

    def ids(self, text: str) -> list[int]:
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        return [self.BOS, *(self.word_id(w) for w in words[: self.max_length - 2]), self.EOS]

    def __call__(self, texts: list[str], pad_to_max: bool = False) -> tuple[Tensor, Tensor]:
        """texts -> ids (B, T) long, mask (B, T) bool; T the longest prompt's length (``max_length`` with
        ``pad_to_max``)."""
        rows = [self.ids(t) for t in texts]
        T = self.max_length if pad_to_max else max(map(len, rows), default=2)
        ids = torch.full((len(rows), T), self.PAD, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids, ids != self.PAD


def build_tiny_encoder(config: TinyTextEncoder, max_length: int) -> nn.Module:
    """The Hugging Face model of ``config`` with weights drawn from ``config.seed`` (torch's global generator is
    left untouched): N(0, 0.02) matrices and embeddings, unit norms, zero biases -- the usual transformer init,
    drawn here so a transformers release that changes its own init does not change the encoder."""
    tf = require_transformers()
    with torch.random.fork_rng(devices=[]):  # the model's own init draws from the global generator
        if config.architecture == "clip":
            model = tf.CLIPTextModel(tf.CLIPTextConfig(
                vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                max_position_embeddings=max_length, pad_token_id=HashedWordTokenizer.PAD,
                bos_token_id=HashedWordTokenizer.BOS, eos_token_id=HashedWordTokenizer.EOS))
        else:
            model = tf.T5EncoderModel(tf.T5Config(
                vocab_size=config.vocab_size, d_model=config.hidden_size, d_kv=config.hidden_size // config.num_heads,
                d_ff=config.intermediate_size, num_layers=config.num_layers, num_heads=config.num_heads,
                dropout_rate=0.0, pad_token_id=HashedWordTokenizer.PAD, eos_token_id=HashedWordTokenizer.EOS))
    g = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # named_parameters' order is fixed by the architecture
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            elif name.endswith("bias"):
                p.zero_()
            else:  # norm scales (T5's relative-attention bias is 2-D: drawn above)
                p.fill_(1.0)
    return model


# --------------------------------------------------------------------------------------
# An encoder from a local folder
# --------------------------------------------------------------------------------------
ARCHITECTURES = {"clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel", "t5": "T5EncoderModel"}


def load_local_encoder(path: str, max_length: int):
    """(encoder, tokenizer, max_length) from a local folder holding a CLIP text model or a T5 (encoder) and its
    tokenizer; nothing downloads. One error line for a missing folder, one that holds no model or another model,
    or a tokenizer that gives the empty prompt no token."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"text encoder not found: {root}; put a Hugging Face CLIP text model or T5 encoder there "
                        "(config.json, the weights and the tokenizer files, as save_pretrained writes them); "
                        "nothing is downloaded")
    tf = require_transformers()
    try:
        config = tf.AutoConfig.from_pretrained(root, local_files_only=True)
    except Exception as e:
        raise UserError(f"{root} holds no Hugging Face model config ({type(e).__name__}); expected a CLIP text "
                        "model or T5 encoder saved with save_pretrained") from None
    kind = getattr(config, "model_type", "?")
    if kind not in ARCHITECTURES:
        raise UserError(f"{root} holds a {kind!r} model, not a CLIP text model or T5 encoder (model_type clip, "
                        "clip_text_model or t5)")
    try:
        encoder = getattr(tf, ARCHITECTURES[kind]).from_pretrained(root, local_files_only=True)
        tokenizer = tf.AutoTokenizer.from_pretrained(root, local_files_only=True)
    except Exception as e:
        raise UserError(f"cannot load the {kind} text encoder in {root}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if tokenizer.pad_token is None:  # padding needs a pad id; the mask keeps it out of attention anyway
        tokenizer.pad_token = tokenizer.eos_token
    limit = getattr(getattr(encoder, "config", None), "max_position_embeddings", None)  # CLIP: 77; T5: none
    return encoder.float(), tokenizer, min(max_length, limit) if limit else max_length


def hf_tokenize(tokenizer, max_length: int):
    """A ``(texts, pad_to_max) -> (ids, mask)`` function around a Hugging Face tokenizer."""
    def tokenize(texts: list[str], pad_to_max: bool = False) -> tuple[Tensor, Tensor]:
        out = tokenizer(list(texts), padding="max_length" if pad_to_max else "longest", truncation=True,
                        max_length=max_length, return_tensors="pt")
        return out["input_ids"], out["attention_mask"].bool()
    return tokenize


class _Frozen:
    """Holds the frozen encoder outside its owner's module tree: not in ``state_dict`` or ``parameters()``, and
    the same object in a deep copy (the EMA model shares it). ``TextCondition._apply`` moves it with the owner."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __deepcopy__(self, memo):
        return self


# --------------------------------------------------------------------------------------
# The condition
# --------------------------------------------------------------------------------------
class TextCondition(Condition):
    """A caption -> a frozen text encoder's per-token features -> a trainable projection (B, T, W) with a padding
    mask; the empty prompt is the null condition. Give ``path`` (a local CLIP text model / T5 encoder folder) or
    ``config`` (a tiny encoder with frozen random weights)."""

    field = "text"
    contract_args = {"config": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32,
                                "vocab_size": 64}, "max_length": 8}
    resumable_args = ("path",)  # the folder may move; the stored probe features check it holds the same encoder

    def __init__(
        self,
        width: int,
        num_classes: int,
        path: Optional[str] = None,  # a local folder with a Hugging Face CLIP text model or T5 encoder + tokenizer
        config: Optional[TinyTextEncoder] = None,  # or a tiny encoder built from this config (random, frozen)
        max_length: int = 32,  # tokens per prompt with begin / end, longer prompts are cut: a sentence or two;
        # it must fit the backbone (MAR: model.buffer_size, 64 for the paper's models); CLIP's own limit is 77
    ):
        super().__init__(width, num_classes)
        if (path is None) == (config is None):
            raise UserError("TextCondition needs exactly one of path (a local CLIP text model / T5 encoder folder) "
                            "and config (a tiny encoder built from a config)")
        if max_length < 2:
            raise UserError(f"TextCondition max_length must be >= 2 (begin and end tokens), got {max_length}")
        if config is not None:
            config = TinyTextEncoder(**config) if isinstance(config, dict) else config
            encoder = build_tiny_encoder(config, max_length)
            self.tokenize = HashedWordTokenizer(config.vocab_size, max_length)
            self.source = f"a tiny {config.architecture} encoder built from {asdict(config)}"
        else:
            encoder, tokenizer, max_length = load_local_encoder(path, max_length)
            self.tokenize = hf_tokenize(tokenizer, max_length)
            self.source = f"the encoder in {Path(path).expanduser()}"
        self._frozen = _Frozen(encoder.requires_grad_(False).eval())
        self.max_tokens = max_length
        null_states, null_mask = self.encode([""])  # (1, T0, E), (1, T0)
        if not bool(null_mask.any()):
            raise UserError(f"the tokenizer of {self.source} gives the empty prompt no token; the null condition "
                            "needs one (CLIP's and T5's tokenizers add begin / end tokens)")
        E = null_states.shape[-1]
        self.register_buffer("null_states", null_states, persistent=False)
        self.register_buffer("null_mask", null_mask, persistent=False)
        self.register_buffer("probe", self.encode([PROBE])[0])  # (1, T, E): stored, so a checkpoint names its encoder
        self.proj = nn.Sequential(nn.LayerNorm(E), nn.Linear(E, width))  # encoders end at different scales

    @property
    def encoder(self) -> nn.Module:
        return self._frozen.module

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(): the frozen encoder goes with the module
        self._frozen.module._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    # -- text -> features --------------------------------------------------------------
    @torch.no_grad()
    def encode(self, texts: list[str], pad_to_max: bool = False) -> tuple[Tensor, Tensor]:
        """Prompts -> the frozen encoder's features (B, T, E) float32 and the real-token mask (B, T) bool, padded
        to the longest prompt (to ``max_length`` with ``pad_to_max``)."""
        ids, mask = self.tokenize(list(texts), pad_to_max)
        device = next(self.encoder.parameters()).device
        out = self.encoder(input_ids=ids.to(device), attention_mask=mask.to(device).long())
        return out.last_hidden_state.float(), mask.to(device)

    def texts(self, data) -> list[str]:
        """The prompts of a batch's conditioning data; one error line for anything else (class labels)."""
        texts = self.select(data)
        if isinstance(texts, str) or isinstance(texts, Tensor) or not all(isinstance(t, str) for t in texts):
            shown = f"a tensor {tuple(texts.shape)}" if isinstance(texts, Tensor) else repr(texts)[:60]
            raise UserError(f"TextCondition reads prompts (a list of strings), got {shown}; a text-conditioned "
                            "run is asked with prompts (--prompt / --prompts, generate(prompts=...)), not labels")
        return list(texts)

    def features(self, data) -> tuple[Tensor, Tensor]:
        """(features (B, T, E), mask (B, T)) of a batch: a latent cache's stored ones, else the encoder's; cut
        after the last real token of the batch."""
        if isinstance(data, dict) and "text_states" in data:
            states, mask = data["text_states"].float(), data["text_mask"].bool()
        else:
            states, mask = self.encode(self.texts(data))
        T = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else 1  # real tokens come first
        return states[:, :T], mask[:, :T]

    def cached(self, data) -> dict[str, Tensor]:
        """What a latent cache stores: each prompt's features padded to ``max_length`` and its mask."""
        states, mask = self.encode(self.texts(data), pad_to_max=True)
        return {"text_states": states, "text_mask": mask}

    # -- the condition -------------------------------------------------------------------
    def forward(self, data, drop: Tensor | None = None, batch: int | None = None) -> ConditionTokens:
        """Prompts (or a cache's features) -> tokens (B, T, W) and mask (B, T); dropped rows (and every row
        without data) get the empty prompt's."""
        if data is None:
            states, mask = self.null_states.expand(batch, -1, -1), self.null_mask.expand(batch, -1)
        else:
            states, mask = self.features(data)
            if drop is not None:
                states, mask = self.with_null(states, mask, drop)
        tokens = self.proj(states) * mask[..., None].to(states.dtype)  # (B, T, W), padding zeroed
        return ConditionTokens(tokens, mask)

    def with_null(self, states: Tensor, mask: Tensor, drop: Tensor) -> tuple[Tensor, Tensor]:
        """The rows where ``drop`` (B,) is True replaced by the empty prompt's features (both padded to one T)."""
        T = max(states.shape[1], self.null_states.shape[1])
        states, mask = _pad(states, mask, T)
        null_states, null_mask = _pad(self.null_states, self.null_mask, T)
        states = torch.where(drop[:, None, None], null_states.to(states.dtype), states)
        return states, torch.where(drop[:, None], null_mask, mask)

    def example(self, batch: int, generator: torch.Generator | None = None) -> list[str]:
        """``batch`` prompts of 1-5 words drawn with ``generator``."""
        lengths = torch.randint(1, 6, (batch,), generator=generator).tolist()
        words = torch.randint(0, len(EXAMPLE_WORDS), (batch, 5), generator=generator).tolist()
        return [" ".join(EXAMPLE_WORDS[w] for w in row[:n]) for row, n in zip(words, lengths)]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "probe")
        if stored is not None and not _same_features(stored, self.probe):
            raise UserError(f"this checkpoint's TextCondition was trained with another text encoder than "
                            f"{self.source} (its features of a probe prompt differ); use the encoder it was "
                            "trained with")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _pad(states: Tensor, mask: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """(B, t, E), (B, t) -> (B, T, E), (B, T): zero features and False mask appended."""
    extra = T - states.shape[1]
    if extra <= 0:
        return states, mask
    B, _, E = states.shape
    return (torch.cat([states, states.new_zeros(B, extra, E)], 1),
            torch.cat([mask, mask.new_zeros(B, extra)], 1))


def _same_features(a: Tensor, b: Tensor) -> bool:
    """Two encoders' probe features agree (up to another machine's float rounding)."""
    if a.shape != b.shape:
        return False
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max()) <= 1e-3 * max(float(b.abs().max()), 1e-6)
