"""The plugin kinds: Tokenizer, Ordering, Condition, Backbone, Head, Dataset -- the contracts, with shapes.

A plugin is a subclass of one of these base classes. Recipes name it with a
jsonargparse ``class_path`` (the short class name works) and ``init_args``.
Arguments that depend on other parts of a recipe (the token grid an ordering
works on, the token and condition widths of a head) are not written in the
recipe: the core passes them as the first positional arguments when it builds
the plugin, so they cannot disagree. docs/writing-plugins.md walks through
writing, testing (``sandbox.testing``) and sharing a plugin.

What the core needs from a plugin beyond its methods, a plugin declares:
``resumable_args`` (init_args a resumed run may change: they do not change
what is trained), ``Head.repeated_blocks`` (what ``torch.compile`` compiles)
and ``Dataset.latents`` (how a batch of items becomes latents: a latent cache
skips the encoder).

Data flows one way: a batch of images becomes a latent grid (Tokenizer), a
token sequence with a visible / loss split (Ordering), condition tokens
(Condition: a class, a caption, an image), one condition vector per position
the head predicts (Backbone), and a loss (Head). Generation runs the same path
backwards.

Shape alphabet: B batch, L sequence length, C token dim, D condition dim,
c latent channels, h/w token grid, H/W image, N rows given to a head,
T condition tokens, W model width.

References:
    MAR: Li et al., "Autoregressive Image Generation without Vector Quantization", NeurIPS 2024.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from sandbox.core.checks import check_images, check_known_prefix
from sandbox.errors import UserError

__all__ = ["Tokenizer", "Ordering", "Condition", "Backbone", "Head", "Dataset", "TrainingSplit", "SampleStep",
           "ConditionTokens", "BackboneSampler", "KINDS"]


# --------------------------------------------------------------------------------------
# Tokenizer: images <-> latent grid <-> token grid
# --------------------------------------------------------------------------------------
class Tokenizer(nn.Module):
    """Images (B,3,H,W) in [-1,1] <-> latent grid (B,c,H/s,W/s); tokens are p x p latent patches.

    Subclasses set ``latent_channels`` (c) and ``stride`` (s) and implement
    ``encode``/``decode``. The scale that makes latents roughly unit-variance
    belongs to the tokenizer (``encode`` returns scaled latents, ``decode``
    takes them), so no other file repeats it; a tokenizer that takes it as a
    ``scale`` argument lets ``sandbox calibrate-scale`` write the measured
    value into a recipe. Tokenizers are frozen: the core
    never trains them and never stores them in a MAR checkpoint.
    """

    contract_args: dict = {}  # small init_args for the contract tests (sandbox.testing)
    resumable_args: tuple[str, ...] = ()  # init_args a resumed run may change (they do not change what is trained)

    latent_channels: int = 3
    stride: int = 1

    def __init__(self, patch_size: int = 1):
        super().__init__()
        if patch_size < 1:
            raise UserError(f"tokenizer patch_size must be >= 1, got {patch_size}")
        self.patch_size = patch_size

    # -- sizes ------------------------------------------------------------------------
    @property
    def token_dim(self) -> int:
        """C: the width of one token, c * p * p."""
        return self.latent_channels * self.patch_size**2

    @property
    def token_stride(self) -> int:
        """Image pixels per token along one side."""
        return self.stride * self.patch_size

    def grid_size(self, image_size: int) -> tuple[int, int]:
        """The token grid (h, w) of a square image; a clear error if it does not divide."""
        if image_size % self.token_stride:
            raise UserError(
                f"image size {image_size} is not divisible by the tokenizer's stride x patch "
                f"({self.stride} x {self.patch_size} = {self.token_stride}); change the dataset's "
                "image_size or the tokenizer's patch_size"
            )
        side = image_size // self.token_stride
        return side, side

    # -- images <-> latents (override) -------------------------------------------------
    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """(B,3,H,W) in [-1,1] -> scaled latent (B,c,H/s,W/s). ``sample``: draw from the posterior
        (training) instead of taking its mean; ignored by deterministic tokenizers."""
        raise NotImplementedError

    def decode(self, latent: Tensor) -> Tensor:
        """Scaled latent (B,c,h',w') -> images (B,3,H,W), roughly in [-1,1]."""
        raise NotImplementedError

    @property
    def codebook(self) -> Tensor | None:
        """(K, c): the codebook of a VQ tokenizer in its scaled latent units (``encode`` then returns rows of it);
        None for continuous latents. A head that declares ``requires = ("codebook",)`` is built with it."""
        return None

    # -- posterior moments: what a latent cache stores (override for stochastic tokenizers) -----
    @property
    def moment_channels(self) -> int:
        """P: channels of ``moments`` (a Gaussian posterior: mean and log-variance, 2c)."""
        return self.latent_channels

    def moments(self, images: Tensor) -> Tensor:
        """(B,3,H,W) -> the deterministic encoder output (B,P,H/s,W/s) that ``latent_from_moments``
        turns into a latent. Default (deterministic tokenizers): the latent itself."""
        return self.encode(images, sample=False)

    def latent_from_moments(self, moments: Tensor, generator: torch.Generator | None = None,
                            sample: bool = True) -> Tensor:
        """(B,P,h',w') -> scaled latent (B,c,h',w'), drawn from the posterior (``sample``) or its mean.
        ``encode(x, g, s)`` must equal ``latent_from_moments(moments(x), g, s)``."""
        return moments

    # -- latents <-> tokens (shared) ------------------------------------------------------
    def to_tokens(self, latent: Tensor) -> Tensor:
        """(B,c,h*p,w*p) -> token grid (B,C,h,w); a token's channels are ordered (c, p, q),
        the official MAR patchify layout."""
        p = self.patch_size
        return rearrange(latent, "b c (h p) (w q) -> b (c p q) h w", p=p, q=p)

    def from_tokens(self, grid: Tensor) -> Tensor:
        """Token grid (B,C,h,w) -> latent (B,c,h*p,w*p)."""
        p = self.patch_size
        return rearrange(grid, "b (c p q) h w -> b c (h p) (w q)", p=p, q=p)


# --------------------------------------------------------------------------------------
# Ordering: token grid <-> sequence, the training split, the sampling plan
# --------------------------------------------------------------------------------------
@dataclass
class TrainingSplit:
    """What one training step shows the transformer and where it takes the loss."""

    inputs: Tensor  # (B, L, C) token values the encoder reads at visible positions
    visible: Tensor  # (B, L) bool; every row has the same number of visible positions
    weight: Tensor  # (B, L) float loss weight per position; 0 means no loss there
    order: Tensor | None = None  # (B, L) long: the generation order, for a backbone that trains causally


@dataclass
class SampleStep:
    """One step of a sampling plan."""

    predict: Tensor  # (B, L) bool: positions sampled at this step (same count per row)
    progress: float  # fraction of the sequence fixed after this step, in (0, 1]; drives CFG schedules


class Ordering:
    """How a token grid becomes a sequence, what training hides, and the order of generation.

    Built by the core as ``OrderingClass(grid, **init_args)`` with ``grid`` the
    token grid (h, w). An ordering owns (a) ``to_sequence``/``to_grid``, (b)
    ``training_split`` (which positions the encoder sees and which carry loss)
    and (c) ``sampling_plan`` (the positions predicted at each step). Every
    position must be predicted exactly once over a plan.
    """

    contract_args: dict = {}  # small init_args for the contract tests (sandbox.testing)
    resumable_args: tuple[str, ...] = ()  # init_args a resumed run may change (they do not change what is trained)

    def __init__(self, grid: tuple[int, int]):
        self.grid = (int(grid[0]), int(grid[1]))

    @property
    def seq_len(self) -> int:
        """L: positions in the sequence (h*w for a flat grid; more for a pyramid)."""
        return self.grid[0] * self.grid[1]

    @property
    def num_groups(self) -> int:
        """Number of position groups (e.g. scales); > 1 gives the transformer a group embedding."""
        return 1

    def groups(self) -> Tensor:
        """(L,) long: the group of each position (all 0 for a flat grid)."""
        return torch.zeros(self.seq_len, dtype=torch.long)

    def to_sequence(self, grid: Tensor) -> Tensor:
        """Token grid (B,C,h,w) -> sequence (B,L,C)."""
        return rearrange(grid, "b c h w -> b (h w) c")

    def to_grid(self, seq: Tensor) -> Tensor:
        """Sequence (B,L,C) -> the token grid (B,C,h,w) to decode."""
        return rearrange(seq, "b (h w) c -> b c h w", h=self.grid[0], w=self.grid[1])

    def training_split(self, seq: Tensor, generator: torch.Generator | None = None) -> TrainingSplit:
        """Sequence (B,L,C) -> what the encoder sees and where the loss is taken."""
        raise NotImplementedError

    def sampling_plan(
        self, batch: int, num_iter: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
        known: Tensor | None = None,
    ) -> list[SampleStep]:
        """The steps of generation for ``batch`` images; ``num_iter`` is a request the ordering may adapt.

        ``known`` (B, L) bool marks positions already fixed (editing: inpainting, outpainting, variations,
        super-resolution): the plan predicts exactly the other positions, each once, and is empty when every
        position is known. Every row must have the same number of unknown positions (the encoder packs the
        visible tokens as (B, n)), else ValueError naming the counts (``count_unknown``); an ordering with
        groups that runs one group per step may also ask for the same count per row within each group.
        ``known=None`` is the plain plan, with the same random draws as before ``known`` existed; a known mask
        of all False gives that same plan.
        """
        raise NotImplementedError

    @staticmethod
    def count_unknown(known: Tensor, batch: int, length: int) -> int:
        """Unknown positions per row of ``known`` (B, L) bool; ValueError unless every row has the same count."""
        if tuple(known.shape) != (batch, length) or known.dtype != torch.bool:
            raise ValueError(f"known must be a ({batch}, {length}) bool tensor, got {tuple(known.shape)} {known.dtype}")
        counts = (~known).sum(1).tolist()
        if len(set(counts)) > 1:
            raise ValueError(f"known leaves {counts} unknown positions in the rows; every row needs the same number "
                             "(the encoder packs the visible tokens of a batch as (B, n))")
        return int(counts[0]) if counts else 0

    def known_from_grid(self, grid_known: Tensor) -> Tensor:
        """Token-grid mask (B, h, w) bool, True = known -> the sequence positions it fixes (B, L) bool.

        The default (flat orderings, whose sequence is the grid in ``to_sequence`` order) is the mask in
        sequence order. An ordering whose positions summarise several cells (a pyramid) marks a position
        known only when every cell it covers is known.
        """
        return rearrange(grid_known, "b h w -> b (h w)")

    def coarse_known(self) -> dict[tuple[int, int], Tensor]:
        """What a coarse view of the token grid fixes (super-resolution): {(h', w'): (L,) bool} -- the positions
        that a grid known only at h' x w' cells (a low-resolution image) determines. Default: none, {} (a flat
        grid has no position that a coarser grid determines). A coarse-to-fine pyramid maps each scale but the
        finest to the positions of that scale and the coarser ones."""
        return {}

    def generation_order(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> Tensor:
        """(B, L) long: each row a permutation of the positions, the order in which they are generated one at a
        time -- what a causal backbone trains on (teacher forcing in this order). Default: the sequence order
        (raster for a flat grid, coarse to fine for a pyramid); a random-order ordering draws a permutation."""
        return torch.arange(self.seq_len, device=device).expand(batch, -1)

    def step_inputs(self, tokens: Tensor, known: Tensor, step: SampleStep) -> tuple[Tensor, Tensor]:
        """Before a sampling step: (tokens (B,L,C), known (B,L) bool) -> (encoder inputs, visible).

        The default shows the encoder what is known. An ordering may fill the
        positions about to be predicted with a guess and make them visible
        (a coarse-to-fine ordering shows the upsampled coarser scale).
        """
        return tokens, known

    def preview(self, tokens: Tensor, known: Tensor) -> tuple[Tensor, Tensor]:
        """Mid-generation picture (animations): (tokens (B,L,C), known (B,L) bool) -> (token grid (B,C,h,w)
        to decode, shown (B,h,w) bool: the grid cells that hold a known value; the rest is drawn grey).

        The default places the known tokens in the grid. A coarse-to-fine ordering may instead show its
        finest known scale upsampled, so an animation goes scale by scale. With every position known it
        must give the grid ``to_grid`` decodes.
        """
        kept = tokens * known[..., None].to(tokens.dtype)  # (B, L, C) unknown positions zeroed
        shown = self.to_grid(known[..., None].to(tokens.dtype))[:, 0] > 0.5  # (B, h, w)
        return self.to_grid(kept), shown


# --------------------------------------------------------------------------------------
# Condition: a batch's conditioning data -> tokens the backbone reads
# --------------------------------------------------------------------------------------
@dataclass
class ConditionTokens:
    """What a condition gives the backbone: ``tokens`` (B, T, W) and, when some are padding, ``mask`` (B, T) bool
    (True: a real token). One token (T = 1) conditions the whole sequence (MAR repeats it over its buffer)."""

    tokens: Tensor
    mask: Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]


class Condition(nn.Module):
    """What a sample is conditioned on -- a class label, a caption, an image -- as tokens the backbone reads, and
    the "no condition" value that classifier-free guidance and condition dropout use.

    Built by the core as ``ConditionClass(width, num_classes, **init_args)``: ``width`` is the backbone's
    (``Backbone.cond_width``), ``num_classes`` the dataset's. ``field`` names the part of a batch it reads:
    a dataset item is (image, data) where data is a class index, or a dict of fields ({"label": 3, "text": "a
    handwritten three"}); batched, ``data`` is a (B,) tensor or a dict of (B,) tensors / lists.
    """

    contract_args: dict = {}  # small init_args for the contract tests (sandbox.testing)
    resumable_args: tuple[str, ...] = ()  # init_args a resumed run may change (they do not change what is trained)
    field: str = "label"  # the batch field it reads
    max_tokens: int | None = None  # T at most (None: not declared); the core checks it against the backbone's room

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.width, self.num_classes = int(width), int(num_classes)

    def select(self, data):
        """This condition's field of a batch's conditioning data (the data itself when it is not a dict)."""
        if isinstance(data, dict):
            if self.field not in data:
                raise UserError(f"condition {type(self).__name__} reads the field {self.field!r}, but the batch "
                                f"holds {sorted(data)}; use a dataset that provides it")
            return data[self.field]
        return data

    def forward(self, data, drop: Tensor | None = None, batch: int | None = None) -> ConditionTokens:
        """The batch's conditioning ``data`` (or None: unconditional, ``batch`` rows) -> ConditionTokens with B
        rows; rows where ``drop`` (B,) bool is True get the null condition (label drop in training, the
        unconditional half of classifier-free guidance)."""
        raise NotImplementedError

    def null(self, batch: int) -> ConditionTokens:
        """The "no condition" value for ``batch`` rows: what ``forward`` gives every dropped row."""
        return self.forward(None, batch=batch)

    def example(self, batch: int, generator: torch.Generator | None = None):
        """A batch of the data this condition reads (the contract kit and ``sandbox bench`` feed it): class
        labels by default."""
        return torch.randint(0, max(self.num_classes, 1), (batch,), generator=generator)

    def cached(self, data) -> dict[str, Tensor]:
        """What a latent cache may store for a batch of this condition's data so that training skips a frozen
        encoder: {name: (B, ...) tensor}, the same for the same data whatever ``width`` and the trained weights
        are. ``forward`` then finds these names among the batch's fields. Default: nothing ({})."""
        return {}


# --------------------------------------------------------------------------------------
# Backbone: (tokens, what is known, the condition) -> a condition vector per predicted position
# --------------------------------------------------------------------------------------
class BackboneSampler:
    """One generation's state of a backbone: ``step`` gives the conditions of the positions a sampling step
    predicts. The default is stateless (every step a full forward); a causal backbone keeps a KV cache here."""

    def __init__(self, backbone: "Backbone", cond: ConditionTokens):
        self.backbone, self.cond = backbone, cond

    def step(self, tokens: Tensor, visible: Tensor, predict: Tensor) -> Tensor:
        """tokens (B, L, C) (the ordering's step inputs), visible (B, L) bool, predict (B, L) bool -> the
        conditions of the predicted positions (N, D), row-major."""
        return self.backbone(tokens, visible, self.cond, query=predict)


class Backbone(nn.Module):
    """Turns a partly known token sequence and the condition into one vector per position the head predicts.

    Built by the core as ``BackboneClass(model, seq_len, token_dim, num_groups, **init_args)``: ``model`` is the
    recipe's ``model:`` settings (widths, depths, heads, dropout, buffer: sandbox.core.transformer.MARConfig),
    so backbones compared in one study have the same size. It sets ``out_dim`` (D, the head's ``cond_dim``)
    and ``cond_width`` (W, the width of the condition tokens it reads).

    Training: ``forward(tokens, visible, cond, query, order)`` -> (N, D) at ``query`` positions (row-major);
    ``training_split`` decides what a training step shows it (default: the ordering's split). Sampling:
    ``start_sampling(cond)`` returns a ``BackboneSampler`` whose ``step`` is called once per step of the plan.
    """

    contract_args: dict = {}  # small init_args for the contract tests (sandbox.testing)
    resumable_args: tuple[str, ...] = ()  # init_args a resumed run may change (they do not change what is trained)
    out_dim: int = 0  # D: the width of the conditions it gives the head
    cond_width: int = 0  # W: the width of the condition tokens it reads
    max_condition_tokens: int | None = None  # the most condition tokens it takes (None: any number)
    one_token_per_step: bool = False  # True: every sampling step must predict exactly one position
    # True: a generation can only continue known tokens that come first in the ordering's generation order (a
    # causal backbone reads the known tokens as a prefix); False: any known set (a bidirectional one sees them all)
    known_prefix_only: bool = False

    def __init__(self, model, seq_len: int, token_dim: int, num_groups: int = 1):
        super().__init__()
        self.seq_len, self.token_dim, self.num_groups = int(seq_len), int(token_dim), int(num_groups)

    def forward(self, tokens: Tensor, visible: Tensor, cond: ConditionTokens, query: Tensor | None = None,
                order: Tensor | None = None) -> Tensor:
        """tokens (B, L, C), visible (B, L) bool, cond (B rows), query (B, L) bool -> z[query] (N, D) (or every
        position, (B, L, D), without ``query``); ``order`` (B, L): the split's generation order, if any."""
        raise NotImplementedError

    def training_split(self, ordering: "Ordering", seq: Tensor, generator: torch.Generator | None = None
                       ) -> TrainingSplit:
        """What a training step shows this backbone: the ordering's split (a bidirectional backbone), or teacher
        forcing in the ordering's ``generation_order`` (a causal one)."""
        return ordering.training_split(seq, generator)

    def start_sampling(self, cond: ConditionTokens) -> BackboneSampler:
        """A new generation of ``len(cond)`` rows (with guidance: the conditional rows, then the unconditional)."""
        return BackboneSampler(self, cond)

    def check_ordering(self, ordering: "Ordering") -> None:
        """Raise UserError when this backbone cannot work with ``ordering`` (default: any ordering)."""

    def check_known(self, known: Tensor, ordering: "Ordering") -> None:
        """Raise UserError when a generation cannot start from the tokens ``known`` (B, L) bool marks (editing:
        inpainting, outpainting, variations, super-resolution). Default: any known set; with ``known_prefix_only``
        only the first k positions of the ordering's ``generation_order``, one k for every row, unless that order
        is drawn per image (a random order: the known tokens can come first in one of its orders)."""
        if self.known_prefix_only:
            check_known_prefix(self, known, ordering)

    def set_groups(self, groups: Tensor) -> None:
        """Take the ordering's (L,) position groups (e.g. scales); ignored by default."""

    def repeated_blocks(self) -> list[nn.Module]:
        """The blocks ``torch.compile`` compiles one by one; default: none."""
        return []


# --------------------------------------------------------------------------------------
# Head: the per-token distribution p(x | z)
# --------------------------------------------------------------------------------------
class Head(nn.Module):
    """A per-token conditional distribution p(x | z), trained by ``loss`` and drawn by ``sample``.

    Built by the core as ``HeadClass(token_dim, cond_dim, **init_args)``. A head built around a hidden
    network sets ``width`` (its hidden width), so the trainer can warn when tokens are large for it.
    A head that needs more from the tokenizer names those tokenizer properties in ``requires``; the core
    passes them as keywords (``HeadClass(token_dim, cond_dim, codebook=tokenizer.codebook, **init_args)``),
    never the recipe, and refuses a tokenizer whose property is None.
    """

    contract_args: dict = {}  # small init_args for the contract tests (sandbox.testing)
    resumable_args: tuple[str, ...] = ()  # init_args a resumed run may change, e.g. ("grad_checkpointing",)
    width: int | None = None  # hidden width of the per-token network; None: not reported (no check)
    has_nll: bool = False  # implements ``nll`` (a likelihood: sandbox eval --nll)
    supports_num_steps: bool = False  # True: ``sample`` honours ``num_steps`` (head-step schedules, issue 22)
    requires: tuple[str, ...] = ()  # tokenizer properties injected as keywords at construction, e.g. ("codebook",)

    def __init__(self, token_dim: int, cond_dim: int):
        super().__init__()
        self.token_dim = int(token_dim)
        self.cond_dim = int(cond_dim)

    def loss(self, target: Tensor, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """target (N,C), cond (N,D) -> per-row loss (N,)."""
        raise NotImplementedError

    def sample(
        self,
        cond: Tensor,
        temperature: float = 1.0,
        cfg: float = 1.0,
        uncond: Tensor | None = None,
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
    ) -> Tensor:
        """cond (N,D) -> samples (N,C). With ``uncond`` (N,D) and ``cfg`` != 1, classifier-free
        guidance mixes the two conditions with scale ``cfg``. ``temperature`` < 1 narrows the
        distribution; each head documents what it scales (e.g. DDPM's per-step noise, an ODE's initial noise).
        ``num_steps``: the head's own sampling steps for this call (None: its configured count); a head
        without steps accepts and ignores it. The core passes it, as a keyword, only when a step schedule
        is set; ``supports_num_steps`` says whether the head honours it."""
        raise NotImplementedError

    @property
    def default_num_steps(self) -> int | None:
        """The step count ``sample`` takes when ``num_steps`` is None: what a head-step schedule's shares ("10%")
        are shares of. None: a head without steps of its own (the default)."""
        return None

    def nll(self, target: Tensor, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """target (N,C), cond (N,D) -> -log p(target | cond) per row (N,), in nats summed over the C dims
        (a density of the continuous token values; an upper bound or an estimate where the head documents it).
        The conditional distribution only: guidance does not enter. Optional: heads that implement it set
        ``has_nll = True``."""
        raise NotImplementedError(f"head {type(self).__name__} has no likelihood (has_nll is False): it does not "
                                  "implement nll(target, cond, generator)")

    def compile_sampling(self) -> None:
        """Make ``sample`` run its per-step work through ``torch.compile`` (``--compile``). Optional: the
        default keeps the eager loop; the core compiles ``repeated_blocks`` either way."""

    def repeated_blocks(self) -> list[nn.Module]:
        """The blocks ``torch.compile`` compiles one by one (``train.compile``, ``--compile``): the repeated
        units of the head's network, e.g. its residual blocks. Default: none (the head runs eagerly)."""
        return []


# --------------------------------------------------------------------------------------
# Dataset: labelled images in [-1, 1]
# --------------------------------------------------------------------------------------
class Dataset(torch.utils.data.Dataset):
    """Labelled images: ``dataset[i] -> (image (3,H,W) float in [-1,1], label int)``, or, for a dataset with more
    conditioning fields than the class (``fields``: a caption, a condition image), ``(image, {"label": int,
    "text": str, ...})``.

    Subclasses set ``image_size`` (H = W) and ``num_classes``. Random
    augmentation happens on whole batches in ``augment`` with the trainer's
    generator, so a seed fixes it whatever the number of loader workers.
    A latent cache sets ``provides = "moments"``: its items are encoded
    images, ``augment`` picks the view (e.g. the flip) of each row, and
    ``latents`` draws the latents from them without the encoder.
    """

    contract_args: dict = {}  # small init_args for the contract tests, or a classmethod returning them (files)
    resumable_args: tuple[str, ...] = ()  # init_args a resumed run may change (e.g. where the files are)

    image_size: int = 0
    num_classes: int = 0
    # the conditioning fields of its items: ("label",) items hold a class index; otherwise a dict of these fields
    fields: tuple[str, ...] = ("label",)
    # what items hold: "images" (the core encodes them with the tokenizer) or "moments" (a latent
    # cache: ``augment`` turns a batch of items into tokenizer moments (B,P,h,w), the core samples
    # latents from them with ``Tokenizer.latent_from_moments``)
    provides: str = "images"

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Never fails during training: a dataset with unreadable files substitutes a readable one."""
        raise NotImplementedError

    def load(self, index: int) -> tuple[Tensor, int] | None:
        """Item ``index`` itself, or None when it cannot be read (exporters such as ``sandbox cache``
        skip it instead of taking a substitute). Default: ``self[index]``."""
        return self[index]

    def augment(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Batch-level random augmentation, (B,3,H,W) -> (B,3,H,W); identity by default."""
        return images

    def latents(self, items: Tensor, tokenizer: Tokenizer, generator: torch.Generator | None = None,
                sample: bool = True) -> Tensor:
        """A training batch of items -> scaled latents (B,c,h',w'), drawn from the tokenizer's posterior
        (``sample``) or its mean: ``augment``, then ``tokenizer.encode``. A latent cache overrides it to draw
        from stored moments (``Tokenizer.latent_from_moments``: no encoder pass)."""
        images = self.augment(items, generator)
        check_images(self, images, self.image_size)
        return tokenizer.encode(images, generator, sample=sample)

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Raise UserError when this dataset cannot feed ``tokenizer`` (a cache made by another one)."""

    def heldout(self) -> Dataset | None:
        """The held-out split: labelled images of the same kind for a likelihood on data the model should not
        have fitted (``sandbox eval --nll``), or None (the default: no split). Its ``repr`` names it in the
        result, so a split that training saw as well (a recipe that trains on everything) should say so there.
        """
        return None

    def check_condition(self, condition: Condition) -> None:
        """Raise UserError when this dataset cannot feed ``condition``: by default when its items lack the field
        the condition reads (a caption for a text condition)."""
        if condition.field not in self.fields:
            raise UserError(f"condition {type(condition).__name__} reads the field {condition.field!r}, but dataset "
                            f"{type(self).__name__} gives {', '.join(map(repr, self.fields))}; use a dataset that "
                            f"provides {condition.field!r} (docs/conditions.md)")

    def conditioning(self, labels: Tensor):
        """The conditioning data that asks for the classes ``labels`` (B,): what sample grids and evaluation
        generate from, the scorer then checking the asked class. Default: the labels themselves; a captioned
        dataset gives {"label": labels, "text": [a prompt per row]}."""
        return labels

    def scorer(self):
        """An offline score for samples of this dataset, or None.

        A scorer has ``score(images (N,3,H,W) in [-1,1], labels (N,)) -> dict[str, float]``
        (for digits: a small classifier's accuracy and a Frechet distance in its features).
        """
        return None


KINDS: dict[str, type] = {"tokenizer": Tokenizer, "ordering": Ordering, "condition": Condition, "backbone": Backbone,
                          "head": Head, "dataset": Dataset}
