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
