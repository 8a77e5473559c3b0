"""Conditions beyond the class label: the text condition (a tiny encoder built from a config, offline; a local
Hugging Face folder), the image condition, captioned data (digits templates, metadata.jsonl), the null condition
that label drop and guidance use, and a text-conditioned run through the CLI (train, sample, eval, cache)."""
from __future__ import annotations

import copy
import json
import re
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_RECIPE

from sandbox.config.recipe import recipe_parser
from sandbox.core.model import MAR
from sandbox.core.transformer import MARBackbone, MARConfig
from sandbox.errors import UserError
from sandbox.plugins.conditions.image import ImageCondition, sobel_edges
from sandbox.plugins.conditions.text import HashedWordTokenizer, TextCondition, require_transformers
from sandbox.plugins.datasets.digits import TEMPLATES, DigitsDataset, caption
from sandbox.plugins.datasets.imagefolder import ImageFolderDataset, write_example_folder
from sandbox.plugins.heads.diffusion import DiffusionHead
from sandbox.testing import check_condition, check_dataset

pytest.importorskip("transformers")  # the [text] extra (the [dev] extra installs it)

TINY = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32, "vocab_size": 4096}
TEXT_RECIPE = {
    **TINY_RECIPE,
    "data": {"class_path": "DigitsDataset", "init_args": {"image_size": 8, "captions": True}},
    "condition": {"class_path": "TextCondition", "init_args": {"config": TINY, "max_length": 12}},
    "model": {**TINY_RECIPE["model"], "buffer_size": 12},
}


def text_condition(width: int = 32, **config) -> TextCondition:
    return TextCondition(width, 10, config={**TINY, **config}, max_length=12)


# --------------------------------------------------------------------------------------
# The text condition
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["t5", "clip"])
def test_text_condition_contract_offline(architecture):
    check_condition(TextCondition, config={**TINY, "architecture": architecture}, max_length=8)


def test_padding_is_masked_and_the_empty_prompt_is_the_null():
    cond = text_condition().eval()
    alone = cond(["a handwritten seven"])
    batch = cond(["a handwritten seven", "the digit 7 on a small dark background"])
    n = int(alone.mask.sum())
    assert alone.mask.all() and n == 5 and batch.mask[0].sum() == n and batch.mask[1].all()  # BOS 3 words EOS
    torch.testing.assert_close(batch.tokens[0, :n], alone.tokens[0])  # padding changes no real token (T5: masked)
    assert (batch.tokens[0, n:] == 0).all()
    null = cond.null(2)
    assert null.mask.tolist() == [[True, True]] * 2  # "" is [BOS, EOS]
    torch.testing.assert_close(null.tokens, cond([""] * 2).tokens)
    cut = cond(["seven " * 40])
    assert cut.tokens.shape[1] == 12  # max_length, end token kept


def test_the_frozen_encoder_is_not_trained_stored_or_copied():
    cond = text_condition()
    assert all(not p.requires_grad for p in cond.encoder.parameters())
    assert not any(name.startswith("encoder") for name in cond.state_dict())  # the probe and the projection only
    assert {n.split(".")[0] for n, _ in cond.named_parameters()} == {"proj"}
    ema = copy.deepcopy(cond)
    assert ema.encoder is cond.encoder  # the EMA copy shares it
    cond.train()
    assert not cond.encoder.training  # dropout never runs in a frozen encoder


def test_a_checkpoint_of_another_encoder_is_refused():
    state = text_condition(seed=0).state_dict()
    text_condition(seed=0).load_state_dict(state)
    with pytest.raises(UserError, match="another text encoder"):
        text_condition(seed=1).load_state_dict(state)


def test_the_digit_captions_words_do_not_share_a_hashed_id():
    vocab = TEXT_DEFAULT_VOCAB = 16384  # TinyTextEncoder's default, the text quickstart's
    tok = HashedWordTokenizer(TEXT_DEFAULT_VOCAB, 16)
    words = {w for t in TEMPLATES for c in range(10) for w in re.findall(r"\w+|[^\w\s]", caption(t, c).lower())}
    assert len({tok.word_id(w) for w in words}) == len(words) and vocab > len(words)
    assert max(len(tok.ids(caption(t, 7))) for t in TEMPLATES) <= 12  # the quickstart's max_length


def test_a_missing_transformers_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError, match=r'pip install -e "\.\[text\]"'):
        require_transformers()


def test_a_clip_text_model_from_a_local_folder(tmp_path):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "a", "handwritten", "seven", "the", "digit", "7"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]",
                                                       special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                bos_token="[BOS]", eos_token="[EOS]")
    config = transformers.CLIPTextConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=20)
    model = transformers.CLIPTextModel(config).eval()
    model.save_pretrained(tmp_path / "clip")
    fast.save_pretrained(tmp_path / "clip")
    cond = TextCondition(32, 10, path=str(tmp_path / "clip"), max_length=64)
    assert cond.max_tokens == 20  # CLIP's position limit
    states, mask = cond.encode(["a handwritten seven"])
    ids = torch.tensor([[2, 4, 5, 6, 3]])
    with torch.no_grad():
        torch.testing.assert_close(states, model(input_ids=ids).last_hidden_state)
    assert mask.all() and cond.null(1).mask.sum() == 2
    check_condition(TextCondition, path=str(tmp_path / "clip"), max_length=8)

    with pytest.raises(UserError, match="text encoder not found"):
        TextCondition(32, 10, path=str(tmp_path / "nowhere"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="holds a 'bert' model, not a CLIP text model or T5 encoder"):
        TextCondition(32, 10, path=str(tmp_path / "bert"))
    with pytest.raises(UserError, match="holds no Hugging Face model config"):
        TextCondition(32, 10, path=str(tmp_path))


# --------------------------------------------------------------------------------------
# The null condition is what label drop and guidance use
# --------------------------------------------------------------------------------------
def _mar(condition: str) -> MAR:
    torch.manual_seed(0)
    cfg = MARConfig(encoder_dim=32, encoder_depth=1, encoder_heads=2, decoder_dim=32, decoder_depth=1,
                    decoder_heads=2, buffer_size=12, attn_dropout=0.0, proj_dropout=0.0)
    cond = {"class": lambda: __import__("sandbox.core.condition", fromlist=["x"]).ClassCondition(32, 10),
            "text": text_condition, "image": lambda: ImageCondition(32, 10, tokens=2, channels=8)}[condition]()
    head = DiffusionHead(12, 32, width=32, depth=1)
    with torch.no_grad():  # its zero-initialised output layers would make every loss ignore the condition
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return MAR(cond, MARBackbone(cfg, 16, 12), head, cfg).eval()


def _data(condition: str, B: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {"class": torch.randint(0, 10, (B,), generator=g),
            "text": [caption(TEMPLATES[int(i)], int(c)) for i, c in zip(torch.randint(0, 20, (B,), generator=g),
                                                                      torch.randint(0, 10, (B,), generator=g))],
            "image": torch.rand(B, 3, 8, 8, generator=g) * 2 - 1}[condition]


@pytest.mark.parametrize("condition", ["class", "text", "image"])
def test_guidance_and_label_drop_use_the_null_condition(condition):
    model, B = _mar(condition), 3
    data = _data(condition, B, 0)
    guided = model.conditions(data, B, guided=True)  # the conditional rows, then the unconditional
    null = model.condition.null(B)
    for r in range(B):
        real = guided.tokens[B + r] if guided.mask is None else guided.tokens[B + r][guided.mask[B + r]]
        want = null.tokens[r] if null.mask is None else null.tokens[r][null.mask[r]]
        torch.testing.assert_close(real, want)
    # training: with label_drop_prob 1 every row is dropped, so the loss does not depend on the data
    seq = torch.randn(B, 16, 12, generator=torch.Generator().manual_seed(1))
    from sandbox.plugins.orderings.random import RandomOrdering

    split = RandomOrdering((4, 4)).training_split(seq, torch.Generator().manual_seed(2))

    def loss(d, p):
        model.config.label_drop_prob = p
        return model(seq, split, d, torch.Generator().manual_seed(3)).item()

    other = _data(condition, B, 5)
    assert loss(data, 1.0) == pytest.approx(loss(other, 1.0), rel=1e-6)
    assert loss(data, 0.0) != pytest.approx(loss(other, 0.0), rel=1e-6)


# --------------------------------------------------------------------------------------
# The image condition
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduce", ["lowres", "edges", "none"])
def test_image_condition_contract(reduce):
    check_condition(ImageCondition, reduce=reduce, tokens=2, channels=8, factor=2)


def test_image_condition_derives_its_input():
    cond = ImageCondition(32, 10, factor=4, tokens=4, channels=8)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert cond.derive(images).shape == (2, 3, 4, 4) and cond(images).tokens.shape == (2, 16, 32)
    step = torch.full((1, 3, 8, 8), -1.0)
    step[..., 4:] = 1.0  # ink on the right half: an edge down the middle
    edges = sobel_edges(step)
    assert edges.shape == step.shape and edges[0, 0, :, 3:5].min() > 0.5 and edges[0, 0, :, :2].max() == -1


# --------------------------------------------------------------------------------------
# Captioned data
# --------------------------------------------------------------------------------------
def test_digits_captions_hold_out_templates():
    ds = DigitsDataset(image_size=8, captions=True, held_out_templates=4)
    assert ds.fields == ("label", "text") and len(ds) == 1797 * 20
    seen = {ds[i][1]["text"] for i in range(0, len(ds), 97)}
    image, data = ds[1797 * 3 + 5]  # template 3, image 5
    assert data == {"label": int(ds.labels[5]), "text": caption(TEMPLATES[3], int(ds.labels[5]))}
    asked = ds.conditioning(torch.arange(40) % 10)
    held = {caption(t, c) for t in TEMPLATES[-4:] for c in range(10)}
    assert set(asked["text"]) == held and not held & seen and asked["label"].tolist() == (torch.arange(40) % 10).tolist()
    assert ds.conditioning(torch.tensor([7]))["text"] == ["a drawing of the digit seven"]
    check_dataset(ds)
    check_dataset(DigitsDataset(image_size=8, captions=True, condition_image=True))
    assert DigitsDataset(image_size=8).fields == ("label",) and isinstance(DigitsDataset(image_size=8)[0][1], int)


def _captioned_folder(tmp_path, lines):
    root = write_example_folder(tmp_path / "images", num_classes=2, per_class=2, corrupt=False)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines))
    return root


ENTRIES = [{"file_name": f"class{c}/img{i}.png", "text": f"picture {i} of class {c}"} for c in range(2) for i in range(2)]


def test_metadata_jsonl_captions(tmp_path):
    ds = ImageFolderDataset(str(_captioned_folder(tmp_path, ENTRIES)), image_size=8, captions=True)
    assert ds.fields == ("label", "text")
    image, data = ds[3]
    assert data == {"label": 1, "text": "picture 1 of class 1"} and image.shape == (3, 8, 8)
    asked = ds.conditioning(torch.tensor([1, 0, 1, 1]))  # the k-th request of a class: its k-th caption, in turn
    assert asked["text"] == ["picture 0 of class 1", "picture 0 of class 0", "picture 1 of class 1",
                             "picture 0 of class 1"] and asked["label"].tolist() == [1, 0, 1, 1]
    check_dataset(ds)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted((tmp_path / "images").rglob("*.png"))):
        p.rename(flat / f"{i}.png")
    (flat / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"./{i}.png", "text": f"t{i}"}) + "\n"
                                                 for i in range(4)))
    ds = ImageFolderDataset(str(flat), image_size=8, captions=True)  # no class folders: one class
    assert ds.num_classes == 1 and [ds[i][1]["text"] for i in range(4)] == ["t0", "t1", "t2", "t3"]


@pytest.mark.parametrize("lines, message", [
    (ENTRIES[:3], r"1 image\(s\) without an entry \(class1/img1.png\)"),
    (ENTRIES + [{"file_name": "class1/img9.png", "text": "x"}], r"1 entry\(ies\) naming no image .*img9.png"),
    (ENTRIES + [ENTRIES[0]], r"metadata.jsonl:5: a second entry for class0/img0.png"),
    (ENTRIES[:1] + ["{not json"] + ENTRIES[1:], r"metadata.jsonl:2: not a JSON object"),
    (ENTRIES[:3] + [{"file_name": "class1/img1.png"}], r'metadata.jsonl:4: expected \{"file_name"'),
])
def test_metadata_jsonl_with_missing_or_extra_entries_is_one_line(tmp_path, lines, message):
    with pytest.raises(UserError, match=message):
        ImageFolderDataset(str(_captioned_folder(tmp_path, lines)), image_size=8, captions=True)


def test_a_captioned_folder_without_metadata_is_one_line(tmp_path):
    root = write_example_folder(tmp_path, 2, 1, corrupt=False)
    with pytest.raises(UserError, match="no metadata.jsonl in"):
        ImageFolderDataset(str(root), image_size=8, captions=True)


# --------------------------------------------------------------------------------------
# Recipes that do not fit
# --------------------------------------------------------------------------------------
def _build(recipe):
    from sandbox.config.build import build

    return build(recipe_parser().parse_object(recipe))


def test_a_text_condition_needs_captions_and_room_in_the_buffer():
    with pytest.raises(UserError, match="reads the field 'text', but dataset DigitsDataset gives 'label'"):
        _build({**TEXT_RECIPE, "data": TINY_RECIPE["data"]})
    with pytest.raises(UserError, match="gives up to 12 tokens but backbone MARBackbone takes 2"):
        _build({**TEXT_RECIPE, "model": TINY_RECIPE["model"]})
    exp = _build(TEXT_RECIPE)
    assert type(exp.model.condition).__name__ == "TextCondition"
    assert type(_build(TINY_RECIPE).model.condition).__name__ == "ClassCondition"  # the default


# --------------------------------------------------------------------------------------
# A text-conditioned run through the CLI
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    from sandbox.cli import main

    root = tmp_path_factory.mktemp("text_run")
    (root / "text.yaml").write_text(yaml.safe_dump(TEXT_RECIPE))
    assert main(["train", "--config", str(root / "text.yaml"), "--run_dir", str(root / "run"),
                 "--train.steps", "4"]) == 0
    return root


def test_train_sample_and_eval_with_prompts(text_run, sandbox_cli, tmp_path):
    run = text_run / "run"
    assert (run / "samples" / "final.png").is_file()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten seven\n\nthe digit 3\n")
    r = sandbox_cli("sample", "--run_dir", run, "--prompts", prompts, "--num_images", 4, "--out", tmp_path / "g.png",
                    "--progress", "false")
    assert r.returncode == 0, r.stderr
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape[1] >= 240 and (grid[:14] < 128).any()  # a caption strip above each prompt's row
    r = sandbox_cli("sample", "--run_dir", run, "--prompt", "the digit 3", "--num_images", 2, "--out",
                    tmp_path / "s.npz", "--progress", "false")
    assert r.returncode == 0, r.stderr
    saved = np.load(tmp_path / "s.npz")
    assert saved["images"].shape == (2, 8, 8, 3) and saved["labels"].tolist() == [-1, -1]
    assert json.loads(str(saved["meta"]))["prompts"] == ["the digit 3"] * 2
    r = sandbox_cli("eval", "--run_dir", run, "--num_images", 20, "--batch_size", 10)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert 0 <= result["accuracy"] <= 1 and result["real_frechet_floor"] > 0
    assert result["prompts"]["distinct"] == 20 and "a drawing of the digit zero" in result["prompts"]["first"]


def test_labels_for_a_text_run_and_prompts_for_a_class_run_are_one_line(text_run, tiny_run, sandbox_cli, tmp_path):
    r = sandbox_cli("sample", "--run_dir", text_run / "run", "--labels", "[3]", "--out", tmp_path / "a.png")
    assert r.returncode == 2 and "not on class labels: --labels does not apply; use --prompt" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = sandbox_cli("sample", "--run_dir", tiny_run, "--prompt", "a seven", "--out", tmp_path / "b.png")
    assert r.returncode == 2 and "not on text: --prompt / --prompts do not apply; use --labels" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_generate_with_prompts(text_run, tiny_run):
    import sandbox

    run = sandbox.load_run(text_run / "run")
    images = sandbox.generate(run, prompts=["a handwritten seven", "the digit 1"], num_iter=2)
    assert images.shape == (2, 3, 8, 8)
    assert sandbox.generate(run, num_images=3, num_iter=2).shape == (3, 3, 8, 8)  # the held-out prompts
    with pytest.raises(UserError, match="pass prompts="):
        sandbox.generate(run, labels=[3])
    with pytest.raises(UserError, match="not on text: pass labels="):
        sandbox.generate(sandbox.load_run(tiny_run), prompts=["a seven"])


def test_cached_text_features_train_as_the_encoder_does(tmp_path):
    """`sandbox cache` of a captioned recipe stores the captions and the frozen encoder's features; training from
    it runs no encoder and draws the same losses; another encoder's cache is refused."""
    from sandbox.cli import main
    from sandbox.plugins.datasets.cached import CachedDataset

    recipe = tmp_path / "text.yaml"
    recipe.write_text(yaml.safe_dump(TEXT_RECIPE))
    assert main(["cache", "--config", str(recipe), "--out", str(tmp_path / "cache"), "--num_workers", "0",
                 "--progress", "false", "--batch_size", "4096"]) == 0
    ds = CachedDataset(str(tmp_path / "cache"), random_flip=False)
    assert ds.fields == ("label", "text", "text_states", "text_mask") and len(ds) == 1797 * 20
    _, data = ds[1797 * 2 + 1]
    assert data["text"] == caption(TEMPLATES[2], data["label"]) and data["text_states"].shape == (12, 16)
    cached = ["--data", "CachedDataset", "--data.path", str(tmp_path / "cache"), "--data.random_flip", "false"]
    for name, extra in (("cached", cached), ("images", [])):
        assert main(["train", "--config", str(recipe), "--run_dir", str(tmp_path / name), *extra]) == 0
    losses = [[json.loads(x)["loss"] for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
              for n in ("cached", "images")]
    assert np.allclose(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    other = copy.deepcopy(TEXT_RECIPE)
    other["condition"]["init_args"]["config"]["seed"] = 1
    with pytest.raises(UserError, match="condition features made by another encoder"):
        _build({**other, "data": {"class_path": "CachedDataset", "init_args": {"path": str(tmp_path / "cache")}}})
