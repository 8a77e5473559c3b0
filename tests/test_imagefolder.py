"""The image-folder dataset: ImageNet layout, ADM center crop, seeded batch flips, unreadable files skipped."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sandbox.errors import UserError
from sandbox.plugins.datasets.imagefolder import ImageFolderDataset, center_crop


@pytest.fixture
def folder(tmp_path):
    """3 classes; RGB, greyscale and RGBA files of odd sizes; one corrupt JPEG and one non-image file."""
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(["n03", "n01", "n02"]):  # classes are sorted by name: n01 -> 0, n02 -> 1, n03 -> 2
        (tmp_path / name).mkdir()
        for i in range(2):
            pixels = torch.randint(0, 256, (20 + 3 * i, 30, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / name / f"img{i}.png")
    Image.fromarray(np.full((40, 16), 200, np.uint8), mode="L").save(tmp_path / "n01" / "grey.png")
    Image.fromarray(np.zeros((16, 16, 4), np.uint8), mode="RGBA").save(tmp_path / "n02" / "alpha.png")
    (tmp_path / "n01" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "n01" / "notes.txt").write_text("not an image")
    return tmp_path


def test_layout_labels_crop_and_range(folder):
    ds = ImageFolderDataset(str(folder), image_size=16)
    assert ds.classes == ["n01", "n02", "n03"] and ds.num_classes == 3
    assert len(ds) == 9  # 6 + grey + alpha + corrupt; the .txt is not an image
    names = [p.split("/")[-2:] for p in ds.paths.tolist()]
    assert names[0] == ["n01", "corrupt.jpg"] and names[1] == ["n01", "grey.png"]  # sorted within a class
    image, label = ds[1]
    assert image.shape == (3, 16, 16) and label == 0
    assert image.min() >= -1 and image.max() <= 1
    assert torch.allclose(image, torch.full_like(image, 200 / 127.5 - 1))  # greyscale -> RGB, values kept
    assert [int(ds.labels[i]) for i in range(len(ds))] == [0, 0, 0, 0, 1, 1, 1, 2, 2]


def test_unreadable_file_is_skipped_counted_and_reported_once(folder, capsys):
    ds = ImageFolderDataset(str(folder), image_size=8)
    assert ds.load(0) is None  # the exporter's view: nothing
    image, label = ds[0]  # the trainer's view: the next readable image instead
    assert torch.equal(image, ds[1][0]) and label == 0
    for _ in range(3):
        ds[0]
    err = capsys.readouterr().err
    assert err.count("skipping unreadable image") == 1 and "corrupt.jpg" in err
    assert list(ds.unreadable) == [str(folder / "n01" / "corrupt.jpg")]


def test_flip_is_batchwise_and_seeded(folder):
    ds = ImageFolderDataset(str(folder), image_size=8)
    batch = torch.stack([ds[i][0] for i in range(1, 9)])
    a = ds.augment(batch, torch.Generator().manual_seed(3))
    b = ds.augment(batch, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    flipped = [torch.equal(a[i], batch[i].flip(-1)) and not torch.equal(a[i], batch[i]) for i in range(8)]
    kept = [torch.equal(a[i], batch[i]) for i in range(8)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    assert torch.equal(ImageFolderDataset(str(folder), 8, random_flip=False).augment(batch), batch)


def test_adm_center_crop():
    # a 64 x 32 image to 8 px: box-halved twice (to 16 x 8), no resize left, then the middle 8 columns
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, 24:40] = 255  # a bright band in the middle third
    out = center_crop(Image.fromarray(arr), 8)
    assert out.shape == (8, 8, 3)
    assert (out[:, 2:6] == 255).all() and (out[:, :2] < 255).all()


def test_missing_or_empty_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="image folder not found"):
        ImageFolderDataset(str(tmp_path / "nope"))
    (tmp_path / "empty" / "class").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        ImageFolderDataset(str(tmp_path / "empty"))


def test_symlink_loops_are_followed_once(folder):
    """A link back to its own class folder (one loop) listed each image 41 times (os.walk follows it until the
    kernel's 40-link limit); a second one made the walk exponential (a hang). Each real directory of a class is
    walked once; a link to a directory elsewhere (a second disk) is still followed."""
    def listed():
        return [p.split("/")[-2:] for p in ImageFolderDataset(str(folder), image_size=16).paths.tolist()]

    expected = listed()
    (folder / "n01" / "loop").symlink_to(folder / "n01")
    assert listed() == expected
    (folder / "n01" / "sub").mkdir()
    (folder / "n01" / "sub" / "back").symlink_to(folder / "n01")
    assert listed() == expected
    elsewhere = folder.parent / f"{folder.name}-elsewhere"
    elsewhere.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(elsewhere / "far.png")
    (folder / "n03" / "disk2").symlink_to(elsewhere)
    assert listed() == expected + [["disk2", "far.png"]]
