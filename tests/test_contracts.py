"""Every registered plugin, of every kind, against its kind's contract (sandbox.testing)."""
from __future__ import annotations

import pytest

from sandbox import registry
from sandbox.testing import check_dataset, check_head, check_ordering, check_tokenizer


def _params(kind):
    found = registry.plugins(kind)
    return pytest.mark.parametrize("cls", list(found.values()), ids=list(found))


@_params("tokenizer")
def test_tokenizer_contract(cls):
    check_tokenizer(cls(**cls.contract_args))


@_params("ordering")
def test_ordering_contract(cls):
    check_ordering(cls, grid=(4, 4), **cls.contract_args)
    check_ordering(cls, grid=(2, 3), **cls.contract_args)


@_params("head")
def test_head_contract(cls):
    check_head(cls, **cls.contract_args)


@_params("dataset")
def test_dataset_contract(cls):
    check_dataset(cls(**cls.contract_args))


def test_every_kind_has_a_builtin():
    for kind in ("tokenizer", "ordering", "head", "dataset"):
        assert registry.plugins(kind), kind
