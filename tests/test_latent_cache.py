"""The latent cache: `sandbox cache` -> train from the cache -> sample; resuming; the tokenizer check."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from sandbox.cli import main
from sandbox.errors import UserError
from sandbox.lab.latent_cache import LatentCache, write_cache
from sandbox.plugins.datasets.cached import CachedDataset
from sandbox.plugins.datasets.imagefolder import (
    ImageFolderDataset,
    write_example_folder,
)
from sandbox.plugins.tokenizers.kl16 import KL16Tokenizer
from sandbox.plugins.tokenizers.pixels import PixelTokenizer
from sandbox.run.rundir import RunDir

# 32 px images -> a 2 x 2 grid of 16-dim KL-16 tokens; a 32-channel KL-16 with random weights (seed 0)
RECIPE = {
    "seed": 0,
    "data": {"class_path": "ImageFolderDataset", "init_args": {"root": "IMAGES", "image_size": 32}},
    "tokenizer": {"class_path": "KL16Tokenizer", "init_args": {"checkpoint": None, "base_channels": 32}},
    "ordering": {"class_path": "RandomOrdering"},
    "head": {"class_path": "DiffusionHead", "init_args": {"width": 32, "depth": 1, "num_sampling_steps": 3}},
    "model": {"encoder_dim": 32, "encoder_depth": 1, "encoder_heads": 2, "decoder_dim": 32, "decoder_depth": 1,
              "decoder_heads": 2, "buffer_size": 2},
    "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "log_every": 1, "ckpt_every": 10},
    "sample": {"num_iter": 2, "grid_classes": 2, "grid_per_class": 1, "batch_size": 4},
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """`sandbox cache` of a 3-class folder of 2 PNGs each, in shards of 4 images."""
    root = tmp_path_factory.mktemp("cache")
    images = write_example_folder(root / "images", num_classes=3, per_class=2, corrupt=False)
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "data": {**RECIPE["data"], "init_args": {
        "root": str(images), "image_size": 32}}}))
    args = ["cache", "--config", recipe, "--out", root / "cache", "--batch_size", 4, "--shard_size", 4,
            "--num_workers", 0, "--progress", "false"]
    assert main([str(a) for a in args]) == 0
    return recipe, images, root / "cache"


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)  # what `build` and `sandbox cache` do before building the recipe's tokenizer
    return KL16Tokenizer(checkpoint=None, base_channels=32)


def test_cache_holds_the_moments_of_each_image_and_its_flip(made, tokenizer):
    _, images, cache = made
    index = json.loads((cache / "index.json").read_text())
    assert index["complete"] and index["count"] == 6 and index["skipped"] == []
    assert [s["rows"] for s in index["shards"]] == [4, 2] and index["moment_shape"] == [32, 2, 2]
    data = LatentCache(cache)
    views, label = data[5]  # in the second shard
    image, want_label = ImageFolderDataset(str(images), image_size=32).load(5)
    with torch.no_grad():
        want = tokenizer.moments(torch.stack([image, image.flip(-1)]))
    assert label == want_label == 2 and views.shape == (2, 32, 2, 2)
    torch.testing.assert_close(views, want, atol=1e-5, rtol=1e-5)


def test_train_from_the_cache_then_sample(made, tmp_path):
    recipe, _, cache = made
    run = tmp_path / "run"
    args = ["train", "--config", recipe, "--data", "CachedDataset", "--data.path", cache, "--run_dir", run]
    assert main([str(a) for a in args]) == 0
    # the same seed trains on the same batches, flips and posterior samples as training on the images
    assert main(["train", "--config", str(recipe), "--run_dir", str(tmp_path / "images")]) == 0
    losses = [[json.loads(line)["loss"] for line in (r / "metrics.jsonl").read_text().splitlines()]
              for r in (run, tmp_path / "images")]
    assert np.allclose(losses[0], losses[1], rtol=1e-4, atol=1e-5) and len(losses[0]) == 3
    ckpt = RunDir(run).load_latest()
    assert ckpt["step"] == 3 and ckpt["meta"] == {"image_size": 32, "num_classes": 3}
    assert ckpt["recipe"]["data"]["class_path"].endswith("CachedDataset")
    assert main(["sample", "--run_dir", str(run), "--num_images", "3", "--out", str(tmp_path / "s.npz"),
                 "--progress", "false"]) == 0
    assert np.load(tmp_path / "s.npz")["images"].shape == (3, 32, 32, 3)


def test_cached_dataset_flips_by_generator_and_checks_its_tokenizer(made, tokenizer):
    ds = CachedDataset(str(made[2]))
    views = torch.stack([ds[i][0] for i in range(len(ds))])  # (6, 2, P, h, w)
    a = ds.augment(views, torch.Generator().manual_seed(0))
    assert torch.equal(a, ds.augment(views, torch.Generator().manual_seed(0))) and a.shape == (6, 32, 2, 2)
    picked = [0 if torch.equal(a[i], views[i, 0]) else 1 for i in range(6)]
    assert all(torch.equal(a[i], views[i, p]) for i, p in enumerate(picked)) and 0 < sum(picked) < 6
    ds.check_tokenizer(tokenizer)  # the tokenizer that made it
    torch.manual_seed(1)
    with pytest.raises(UserError, match="different tokenizer"):
        ds.check_tokenizer(KL16Tokenizer(checkpoint=None, base_channels=32))  # same shapes, other weights
    with pytest.raises(UserError, match="moments of shape"):
        ds.check_tokenizer(PixelTokenizer(1))  # another kind of tokenizer altogether


class _Interrupted:
    """An image dataset (duck-typed, so not a registered plugin) whose reads stop at one index, once."""

    def __init__(self, dataset, at: int):
        self.dataset, self.at = dataset, at
        self.image_size, self.num_classes = dataset.image_size, dataset.num_classes

    def __len__(self):
        return len(self.dataset)

    def load(self, index):
        if index == self.at:
            self.at = None
            raise KeyboardInterrupt
        return self.dataset.load(index)


def test_resuming_an_interrupted_cache_gives_the_same_cache(tmp_path):
    folder = ImageFolderDataset(str(write_example_folder(tmp_path / "images", 3, 2)), image_size=8)  # + corrupt
    tok = PixelTokenizer(1)  # resuming does not depend on the tokenizer: raw pixels keep this test instant
    write_cache(folder, tok, tmp_path / "whole", recipe={}, batch_size=2, shard_size=4, progress=False)
    stopping = _Interrupted(folder, at=5)
    with pytest.raises(KeyboardInterrupt):
        write_cache(stopping, tok, tmp_path / "split", recipe={}, batch_size=2, shard_size=4, progress=False)
    with pytest.raises(UserError, match="incomplete"):
        LatentCache(tmp_path / "split")
    write_cache(stopping, tok, tmp_path / "split", recipe={}, batch_size=2, shard_size=4, progress=False)
    whole, split = LatentCache(tmp_path / "whole"), LatentCache(tmp_path / "split")
    assert len(whole) == len(split) == 6 and whole.index["skipped"] == split.index["skipped"] == [0]  # broken.jpg
    assert np.load(tmp_path / "split" / "sources.npy")[:6].tolist() == [1, 2, 3, 4, 5, 6]  # capacity 7
    for j in range(6):
        assert torch.equal(whole[j][0], split[j][0]) and whole[j][1] == split[j][1]
    with pytest.raises(UserError, match="different settings"):
        write_cache(folder, tok, tmp_path / "split", recipe={}, batch_size=2, shard_size=5, progress=False)
