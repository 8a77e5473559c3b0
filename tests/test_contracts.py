"""Every registered plugin, of every kind, against its kind's contract (sandbox.testing)."""
from __future__ import annotations

import pytest

from sandbox.config import registry
from sandbox.testing import (
    check_backbone,
    check_condition,
    check_dataset,
    check_head,
    check_ordering,
    check_tokenizer,
    contract_args,
)


def _params(kind):
    found = registry.plugins(kind)
    return pytest.mark.parametrize("cls", list(found.values()), ids=list(found))


@_params("tokenizer")
def test_tokenizer_contract(cls):
    check_tokenizer(cls(**contract_args(cls)))


@_params("ordering")
def test_ordering_contract(cls):
    check_ordering(cls, grid=(4, 4), **contract_args(cls))
    check_ordering(cls, grid=(2, 3), **contract_args(cls))


@_params("condition")
def test_condition_contract(cls):
    check_condition(cls, **contract_args(cls))


@_params("backbone")
def test_backbone_contract(cls):
    check_backbone(cls, **contract_args(cls))


@_params("head")
def test_head_contract(cls):
    check_head(cls, **contract_args(cls))


@_params("dataset")
def test_dataset_contract(cls):
    check_dataset(cls(**contract_args(cls)))


def test_every_kind_has_a_builtin():
    for kind in ("tokenizer", "ordering", "condition", "backbone", "head", "dataset"):
        assert registry.plugins(kind), kind


def test_grey_pixel_tokens_are_exact_for_greyscale_data_and_pass_the_kit():
    """``PixelTokenizer(channels=1)``: a token is a grey patch (p^2 dims); the digits (three equal channels)
    round-trip exactly, an RGB image decodes to its channel mean, and the kit holds for it."""
    import torch

    from sandbox.errors import UserError
    from sandbox.plugins.datasets.digits import load_digits_tensor
    from sandbox.plugins.tokenizers.pixels import PixelTokenizer

    tok = PixelTokenizer(patch_size=2, channels=1)
    assert tok.token_dim == 4 and PixelTokenizer(patch_size=2).token_dim == 12
    digits = load_digits_tensor(16)[0][:8]
    assert torch.equal(tok.decode(tok.encode(digits)), digits)
    rgb = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.allclose(tok.decode(tok.encode(rgb))[:, 1], rgb.mean(1))
    check_tokenizer(PixelTokenizer, patch_size=2, channels=1)
    with pytest.raises(UserError, match="channels must be 1"):
        PixelTokenizer(channels=2)
