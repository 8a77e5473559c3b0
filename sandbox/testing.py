"""The contract kit: one check per plugin kind, for plugin authors' tests and the project's own.

    from sandbox.testing import check_head
    def test_my_head():
        check_head(MyHead, width=32)

Each check builds the plugin small, exercises its contract (shapes, dtypes,
invariants from ``sandbox.kinds``) and raises ``AssertionError`` naming the
broken promise. Plugins may declare ``contract_args`` (small init_args) so
the project's suite can check them with no further setup.
"""
from __future__ import annotations

import torch

from sandbox.kinds import Dataset, Head, Ordering, SampleStep, Tokenizer, TrainingSplit


def _fail(plugin, msg: str) -> AssertionError:
    return AssertionError(f"{getattr(plugin, '__name__', type(plugin).__name__)}: {msg}")


def contract_args(cls) -> dict:
    """A plugin's small init_args for the contract tests: its ``contract_args`` dict, or what its
    ``contract_args()`` classmethod returns (for plugins that need files, e.g. a folder it writes)."""
    args = cls.contract_args
    return dict(args() if callable(args) else args)


def check_tokenizer(tokenizer: Tokenizer, image_size: int | None = None, batch: int = 2) -> None:
    """encode -> (B,c,H/s,W/s); to_tokens/from_tokens invert each other; decode returns (B,3,H,W);
    moments -> (B,P,H/s,W/s) and latent_from_moments(moments(x)) == encode(x) for the same generator."""
    assert isinstance(tokenizer, Tokenizer), _fail(tokenizer, "is not a Tokenizer")
    s = image_size or tokenizer.token_stride * 4
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, s, s, generator=g) * 2 - 1
    with torch.no_grad():
        latent = tokenizer.encode(images, generator=g, sample=False)
        expect = (batch, tokenizer.latent_channels, s // tokenizer.stride, s // tokenizer.stride)
        if tuple(latent.shape) != expect:
            raise _fail(tokenizer, f"encode gave {tuple(latent.shape)}, expected {expect}")
        grid = tokenizer.to_tokens(latent)
        h, w = tokenizer.grid_size(s)
        if tuple(grid.shape) != (batch, tokenizer.token_dim, h, w):
            raise _fail(tokenizer, f"to_tokens gave {tuple(grid.shape)}, expected {(batch, tokenizer.token_dim, h, w)}")
        if not torch.equal(tokenizer.from_tokens(grid), latent):
            raise _fail(tokenizer, "from_tokens(to_tokens(latent)) != latent")
        decoded = tokenizer.decode(latent)
        if tuple(decoded.shape) != tuple(images.shape):
            raise _fail(tokenizer, f"decode gave {tuple(decoded.shape)}, expected {tuple(images.shape)}")
        if not torch.isfinite(decoded).all():
            raise _fail(tokenizer, "decode returned non-finite values")
        again = tokenizer.encode(images, generator=torch.Generator().manual_seed(1), sample=False)
        if not torch.allclose(again, latent, atol=1e-5):
            raise _fail(tokenizer, "encode(sample=False) is not deterministic")
        # posterior moments (what a latent cache stores) must give the same latents as encode
        moments = tokenizer.moments(images)
        if tuple(moments.shape) != (batch, tokenizer.moment_channels, *expect[2:]):
            raise _fail(tokenizer, f"moments gave {tuple(moments.shape)}, expected "
                                   f"{(batch, tokenizer.moment_channels, *expect[2:])}")
        if not torch.allclose(tokenizer.latent_from_moments(moments, sample=False), latent, atol=1e-5):
            raise _fail(tokenizer, "latent_from_moments(moments(x), sample=False) != encode(x, sample=False)")
        drawn = [tokenizer.latent_from_moments(moments, torch.Generator().manual_seed(2)) for _ in range(2)]
        if not torch.equal(drawn[0], drawn[1]) or tuple(drawn[0].shape) != expect:
            raise _fail(tokenizer, "latent_from_moments must be fixed by its generator and give latent shapes")
        if not torch.allclose(tokenizer.encode(images, torch.Generator().manual_seed(2)), drawn[0], atol=1e-5):
            raise _fail(tokenizer, "encode(x, g) != latent_from_moments(moments(x), g)")


def check_ordering(factory, grid: tuple[int, int] = (4, 4), batch: int = 3, token_dim: int = 5,
                   num_iters: tuple[int, ...] = (1, 3, 7), **init_args) -> None:
    """Sequence round trip; training split shapes and equal visible counts; every position predicted once."""
    ordering = factory(grid, **init_args)
    assert isinstance(ordering, Ordering), _fail(factory, "is not an Ordering")
    L = ordering.seq_len
    g = torch.Generator().manual_seed(0)
    grid_t = torch.randn(batch, token_dim, *grid, generator=g)
    seq = ordering.to_sequence(grid_t)
    if tuple(seq.shape) != (batch, L, token_dim):
        raise _fail(factory, f"to_sequence gave {tuple(seq.shape)}, expected {(batch, L, token_dim)}")
    back = ordering.to_grid(seq)
    if tuple(back.shape) != tuple(grid_t.shape):
        raise _fail(factory, f"to_grid gave {tuple(back.shape)}, expected {tuple(grid_t.shape)}")
    groups = ordering.groups()
    if tuple(groups.shape) != (L,) or int(groups.max()) >= ordering.num_groups or int(groups.min()) < 0:
        raise _fail(factory, "groups() must be (L,) with values in [0, num_groups)")
    for _ in range(5):
        split = ordering.training_split(seq, g)
        if not isinstance(split, TrainingSplit):
            raise _fail(factory, "training_split must return a TrainingSplit")
        if tuple(split.visible.shape) != (batch, L) or split.visible.dtype != torch.bool:
            raise _fail(factory, "visible must be (B, L) bool")
        if tuple(split.weight.shape) != (batch, L) or tuple(split.inputs.shape) != tuple(seq.shape):
            raise _fail(factory, "weight must be (B, L) and inputs (B, L, C)")
        counts = split.visible.sum(1)
        if not (counts == counts[0]).all():
            raise _fail(factory, "every row must have the same number of visible positions")
        if not (split.weight >= 0).all() or not (split.weight.sum(1) > 0).all():
            raise _fail(factory, "loss weights must be >= 0 with some loss in every row")
    for num_iter in num_iters:
        plan = ordering.sampling_plan(batch, num_iter, g)
        if not plan or not all(isinstance(s, SampleStep) for s in plan):
            raise _fail(factory, f"sampling_plan({num_iter}) must be a non-empty list of SampleStep")
        times = torch.zeros(batch, L, dtype=torch.long)
        known = torch.zeros(batch, L, dtype=torch.bool)
        last = 0.0
        for step in plan:
            if tuple(step.predict.shape) != (batch, L):
                raise _fail(factory, "SampleStep.predict must be (B, L)")
            n = step.predict.sum(1)
            if not (n == n[0]).all() or int(n[0]) == 0:
                raise _fail(factory, "each step must predict the same positive number of positions per row")
            inputs, visible = ordering.step_inputs(torch.zeros(batch, L, token_dim), known, step)
            if tuple(visible.shape) != (batch, L) or not (visible.sum(1) == visible.sum(1)[0]).all():
                raise _fail(factory, "step_inputs must give (B, L) visibility with equal counts per row")
            if not 0.0 < step.progress <= 1.0 or step.progress < last:
                raise _fail(factory, "progress must be non-decreasing in (0, 1]")
            last = step.progress
            times += step.predict.long()
            known |= step.predict
        if not (times == 1).all():
            raise _fail(factory, f"with num_iter={num_iter} some position is predicted {int(times.max())}x or never")


def check_head(factory, token_dim: int = 6, cond_dim: int = 16, n: int = 10, **init_args) -> None:
    """loss (N,) finite and differentiable w.r.t. the condition; sample (N,C) finite, seeded, guided."""
    head = factory(token_dim, cond_dim, **init_args)
    assert isinstance(head, Head), _fail(factory, "is not a Head")
    if head.token_dim != token_dim or head.cond_dim != cond_dim:
        raise _fail(factory, "must keep the token_dim and cond_dim it is built with")
    g = torch.Generator().manual_seed(0)
    target = torch.rand(n, token_dim, generator=g) * 2 - 1
    cond = torch.randn(n, cond_dim, generator=g, requires_grad=True)
    loss = head.loss(target, cond, g)
    if tuple(loss.shape) != (n,) or not torch.isfinite(loss).all():
        raise _fail(factory, f"loss must be finite with shape (N,), got {tuple(loss.shape)}")
    loss.mean().backward()
    if cond.grad is None:
        raise _fail(factory, "loss must be differentiable with respect to the condition")
    head.eval()
    c = cond.detach()
    a = head.sample(c, generator=torch.Generator().manual_seed(1))
    b = head.sample(c, generator=torch.Generator().manual_seed(1))
    if tuple(a.shape) != (n, token_dim) or not torch.isfinite(a).all():
        raise _fail(factory, f"sample must be finite with shape (N, C), got {tuple(a.shape)}")
    if not torch.equal(a, b):
        raise _fail(factory, "sample with the same generator seed must be identical")
    guided = head.sample(c, temperature=0.9, cfg=2.0, uncond=torch.zeros_like(c), generator=g)
    if tuple(guided.shape) != (n, token_dim) or not torch.isfinite(guided).all():
        raise _fail(factory, "guided sample must be finite with shape (N, C)")


def check_dataset(dataset: Dataset, max_items: int = 4) -> None:
    """Items are ((3,S,S) float in [-1,1], int label in [0, num_classes)); augment keeps shapes.
    A latent cache (``provides == "moments"``): augment turns items into (B,P,h,w) moments."""
    assert isinstance(dataset, Dataset), _fail(dataset, "is not a Dataset")
    if len(dataset) == 0:
        raise _fail(dataset, "is empty")
    if dataset.image_size <= 0 or dataset.num_classes <= 0:
        raise _fail(dataset, "must set image_size and num_classes")
    S = dataset.image_size
    items = [dataset[i] for i in range(min(max_items, len(dataset)))]
    for i, (image, label) in enumerate(items):
        loaded = dataset.load(i)
        if loaded is not None and (not torch.equal(loaded[0], image) or int(loaded[1]) != int(label)):
            raise _fail(dataset, f"load({i}) must be None (unreadable) or equal dataset[{i}]")
    if dataset.provides == "moments":
        batch = torch.stack([x for x, _ in items])
        out = dataset.augment(batch, torch.Generator().manual_seed(0))
        if out.ndim != 4 or out.shape[0] != batch.shape[0] or not out.is_floating_point():
            raise _fail(dataset, f"augment must give float moments (B, P, h, w), got {tuple(out.shape)}")
        for label in (int(lab) for _, lab in items):
            if not 0 <= label < dataset.num_classes:
                raise _fail(dataset, f"label {label} outside [0, {dataset.num_classes})")
        return
    if dataset.provides != "images":
        raise _fail(dataset, f"provides must be 'images' or 'moments', got {dataset.provides!r}")
    for image, label in items:
        if tuple(image.shape) != (3, S, S) or not image.is_floating_point():
            raise _fail(dataset, f"images must be float (3, {S}, {S}), got {tuple(image.shape)} {image.dtype}")
        if image.min() < -1 - 1e-5 or image.max() > 1 + 1e-5:
            raise _fail(dataset, "images must lie in [-1, 1]")
        if not 0 <= int(label) < dataset.num_classes:
            raise _fail(dataset, f"label {label} outside [0, {dataset.num_classes})")
    batch = torch.stack([im for im, _ in items])
    out = dataset.augment(batch, torch.Generator().manual_seed(0))
    if tuple(out.shape) != tuple(batch.shape):
        raise _fail(dataset, "augment must keep the batch shape")
