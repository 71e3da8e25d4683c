"""Datasets: image folders (captions, labels, corrupt files, crops), CIFAR-10 batches, digits, the registry."""

import json
import logging
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from latentdiff.data import CIFAR10, Digits, ImageFolder, make_dataset
from latentdiff.data.cifar10 import CLASSES, load_pickle
from latentdiff.data.transforms import convert_channels, to_pil, to_tensor


def save(path, size=(20, 20), colour=(255, 0, 0), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, format=fmt)
    return path


def gradient(path, w=48, h=40):
    """An RGB image whose every pixel differs, so different crops give different tensors."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 5 % 256, y * 6 % 256, (x * y) % 256], -1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


# ---- image folders ---------------------------------------------------------------------------------------


def test_folder_formats_shapes_and_values(tmp_path):
    save(tmp_path / "a.png", (40, 30), (255, 0, 0))
    save(tmp_path / "b.jpg", (30, 50), (0, 0, 255))
    save(tmp_path / "sub" / "c.webp", (16, 16), (0, 255, 0), fmt="WEBP")
    save(tmp_path / "sub" / "d.JPEG", (16, 16), (0, 0, 0))
    (tmp_path / "notes.md").write_text("not an image")
    save(tmp_path / ".hidden" / "e.png")  # hidden folders are ignored
    ds = ImageFolder(tmp_path, 16)
    assert len(ds) == 4 and ds.num_skipped == 0
    assert [os.path.basename(p) for p in ds.paths] == ["a.png", "b.jpg", "c.webp", "d.JPEG"]
    for i in range(4):
        x = ds[i]["image"]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
    red = ds[0]["image"]
    assert torch.allclose(red[0], torch.ones(16, 16)) and torch.allclose(red[1], -torch.ones(16, 16))
    assert "caption" not in ds[0] and "label" not in ds[0] and ds.classes is None


def test_center_crop_keeps_the_middle(tmp_path):
    # 32 wide x 16 high: black left half, white right half; covering 16x16 needs no resize, crop cols 8..24.
    arr = np.zeros((16, 32), np.uint8)
    arr[:, 16:] = 255
    Image.fromarray(arr, "L").save(tmp_path / "x.png")
    x = ImageFolder(tmp_path, 16, channels=1)[0]["image"]
    assert x.shape == (1, 16, 16)
    assert torch.all(x[:, :, :8] == -1) and torch.all(x[:, :, 8:] == 1)


def test_non_square_size_and_channels(tmp_path):
    save(tmp_path / "a.png", (64, 64), (10, 200, 30))
    ds = ImageFolder(tmp_path, (8, 12), channels=4)
    x = ds[0]["image"]
    assert x.shape == (4, 8, 12) and torch.all(x[3] == 1)  # opaque alpha
    grey = ImageFolder(tmp_path, 8, channels=1)[0]["image"]
    assert grey.shape == (1, 8, 8)
    with pytest.raises(ValueError, match="channels"):
        ImageFolder(tmp_path, 8, channels=2)


def test_random_crop_and_flip_are_reproducible_per_epoch(tmp_path):
    for i in range(3):
        gradient(tmp_path / f"{i}.png")
    ds = ImageFolder(tmp_path, 16, crop="random", flip=True, seed=7)
    first = [ds[i]["image"] for i in range(3)]
    assert all(torch.equal(a, ds[i]["image"]) for i, a in enumerate(first))  # same epoch, same item
    fresh = ImageFolder(tmp_path, 16, crop="random", flip=True, seed=7)  # a resumed run rebuilds the dataset
    assert all(torch.equal(a, fresh[i]["image"]) for i, a in enumerate(first))
    ds.set_epoch(1)
    second = [ds[i]["image"] for i in range(3)]
    assert any(not torch.equal(a, b) for a, b in zip(first, second))
    assert all(torch.equal(b, fresh[(i, 1)]["image"]) for i, b in enumerate(second))  # (index, epoch) form
    other_seed = ImageFolder(tmp_path, 16, crop="random", flip=True, seed=8)
    assert any(not torch.equal(a, other_seed[i]["image"]) for i, a in enumerate(first))
    same = tmp_path / "same"
    for i in range(4):
        gradient(same / f"{i}.png")  # one picture four times: the crops must still differ by index
    copies = ImageFolder(same, 16, crop="random", seed=7)
    assert len({tuple(copies[i]["image"].flatten().tolist()) for i in range(4)}) > 1
    copies.set_epoch(1)
    assert len({tuple(copies[i]["image"].flatten().tolist()) for i in range(4)}) > 1
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(ds.get(0, generator=g1)["image"], ds.get(0, generator=g2)["image"])


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    for i in range(3):
        save(tmp_path / f"good{i}.png", colour=(i * 50, 0, 0))
    (tmp_path / "garbage.png").write_bytes(b"this is not a png at all" * 10)
    data = (tmp_path / "good0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="latentdiff.data.folder"):
        ds = ImageFolder(tmp_path, 8)
    assert len(ds) == 3 and ds.num_skipped == 2
    assert "skipped 2 unreadable" in caplog.text and "garbage.png" in caplog.text
    assert all(ds[i]["image"].shape == (3, 8, 8) for i in range(3))


def test_image_that_fails_to_decode_later_is_replaced_with_a_warning(tmp_path, caplog):
    arr = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=95)
    save(tmp_path / "b.png", colour=(0, 255, 0))
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(data[: len(data) // 2])  # headers intact: verify passes, decoding fails
    ds = ImageFolder(tmp_path, 8)
    assert len(ds) == 2
    with caplog.at_level(logging.WARNING, logger="latentdiff.data.folder"):
        item = ds[0]
    assert item["path"].endswith("b.png") and item["index"] == 0
    assert "could not decode" in caplog.text


def test_folder_errors_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty", 8)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="could be read"):
        ImageFolder(tmp_path / "bad", 8)


def test_metadata_captions_and_labels(tmp_path):
    save(tmp_path / "a.png")
    save(tmp_path / "sub" / "b.png", colour=(0, 255, 0))
    save(tmp_path / "c.png", colour=(0, 0, 255))
    lines = [
        {"file_name": "a.png", "text": "a red square", "label": "red"},
        {"file_name": "sub/b.png", "caption": "a green square", "label": "green"},
        {"file_name": "c.png", "text": "a blue square", "label": "blue"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    ds = ImageFolder(tmp_path, 8)
    assert ds.caption_source == "metadata" and ds.label_source == "metadata"
    by_name = {os.path.basename(ds[i]["path"]): ds[i] for i in range(len(ds))}
    assert by_name["b.png"]["caption"] == "a green square"
    assert ds.classes == ["blue", "green", "red"]
    assert by_name["a.png"]["label"] == 2 and by_name["c.png"]["label"] == 0
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 8, 8) and batch["label"].dtype == torch.long
    assert sorted(batch["caption"]) == ["a blue square", "a green square", "a red square"]


def test_metadata_errors_name_line_and_field(tmp_path):
    save(tmp_path / "a.png")
    save(tmp_path / "b.png")
    meta = tmp_path / "metadata.jsonl"
    meta.write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n" + json.dumps({"file_name": "b.png"}) + "\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: missing required field 'text'"):
        ImageFolder(tmp_path, 8)
    meta.write_text(json.dumps({"file_name": "a.png", "label": 1}) + "\n" + json.dumps({"file_name": "b.png"}) + "\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: missing required field 'label'"):
        ImageFolder(tmp_path, 8)
    meta.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: missing required field 'file_name'"):
        ImageFolder(tmp_path, 8)
    meta.write_text(json.dumps({"file_name": "nope.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: file_name 'nope.png' does not exist"):
        ImageFolder(tmp_path, 8)
    meta.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: not valid JSON"):
        ImageFolder(tmp_path, 8)
    meta.write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")  # b.png has no line
    with pytest.raises(ValueError, match=r"b.png: no line in metadata.jsonl"):
        ImageFolder(tmp_path, 8)


def test_sidecar_txt_captions(tmp_path):
    save(tmp_path / "cat.png")
    save(tmp_path / "dog.jpg")
    (tmp_path / "cat.txt").write_text("a photo of a cat\n")
    (tmp_path / "dog.txt").write_text("a dog")
    ds = ImageFolder(tmp_path, 8)
    assert ds.caption_source == "txt"
    assert [ds[i]["caption"] for i in range(2)] == ["a photo of a cat", "a dog"]
    (tmp_path / "dog.txt").unlink()
    with pytest.raises(FileNotFoundError, match="dog.txt"):
        ImageFolder(tmp_path, 8)
    assert not ImageFolder(tmp_path, 8, captions="none").has_captions


def test_labels_from_subfolders(tmp_path):
    for cls, n in (("cats", 2), ("dogs", 1)):
        for i in range(n):
            save(tmp_path / cls / f"{i}.png")
    ds = ImageFolder(tmp_path, 8)
    assert ds.label_source == "folder" and ds.classes == ["cats", "dogs"] and ds.num_classes == 2
    assert [ds[i]["label"] for i in range(3)] == [0, 0, 1]
    assert "label" not in ImageFolder(tmp_path, 8, labels="none")[0]


def test_channel_conversions(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(convert_channels(rgba, 3)).tolist() == [[[255, 255, 255]] * 4] * 4  # over white
    assert convert_channels(rgba, 4).mode == "RGBA"
    sixteen = Image.fromarray(np.full((4, 4), 32768, np.uint16))  # 16-bit grey at half range
    assert sixteen.mode.startswith("I")
    assert np.asarray(convert_channels(sixteen, 1)).max() == 128  # scaled, not clipped to 255
    with pytest.raises(ValueError, match="LAB"):
        convert_channels(Image.new("LAB", (2, 2)), 3)
    x = torch.rand(3, 5, 7) * 2 - 1
    assert torch.allclose(to_tensor(to_pil(x)), x, atol=1 / 127.5)


# ---- CIFAR-10 ----------------------------------------------------------------------------------------------


def write_fake_cifar(folder, n=4, meta=True, rng=None):
    rng = rng or np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:  # protocol 2, like the published (python 2) files
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data}, f, protocol=2)
    if meta:
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}, f, protocol=2)
    return batches


def test_cifar10_reads_fake_batches(tmp_path):
    batches = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    train = CIFAR10(tmp_path)  # the parent folder works too
    test = CIFAR10(tmp_path / "cifar-10-batches-py", train=False)
    assert len(train) == 20 and len(test) == 4 and train.classes == list(CLASSES)
    data, labels = batches["data_batch_2"]
    item = train[4 + 1]  # second row of the second batch
    c, y, x = 2, 5, 7
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"][c, y, x].item() == pytest.approx(data[1, c * 1024 + y * 32 + x] / 127.5 - 1)
    assert item["label"] == labels[1] and item["caption"] == CLASSES[labels[1]]
    assert test[3]["label"] == batches["test_batch"][1][3]


def test_cifar10_reads_numpy1_pickles_and_missing_meta(tmp_path):
    write_fake_cifar(tmp_path, meta=False)
    for name in os.listdir(tmp_path):  # the published files name numpy.core.multiarray (numpy 1.x)
        raw = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    ds = CIFAR10(tmp_path, train=False)
    assert len(ds) == 4 and ds.classes == list(CLASSES)


def test_cifar10_missing_file_is_named(tmp_path):
    write_fake_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        CIFAR10(tmp_path)
    assert len(CIFAR10(tmp_path, train=False)) == 4
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CIFAR10(tmp_path / "nowhere")


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_cifar10_refuses_code_in_pickles(tmp_path):
    write_fake_cifar(tmp_path)
    target = str(tmp_path / "pwned")
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Evil(target)}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        CIFAR10(tmp_path, train=False)
    assert not os.path.exists(target)
    with open(tmp_path / "obj", "wb") as f:
        pickle.dump(np.array([1, "a"], dtype=object), f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="objects"):
        load_pickle(tmp_path / "obj")


def test_cifar10_bad_batch_contents(tmp_path):
    write_fake_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"test_batch: 'data' must be uint8 of shape \(N, 3072\)"):
        CIFAR10(tmp_path, train=False)
    (tmp_path / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="test_batch"):
        CIFAR10(tmp_path, train=False)


def test_cifar10_flip_is_seeded(tmp_path):
    write_fake_cifar(tmp_path)
    a, b = CIFAR10(tmp_path, flip=True, seed=1), CIFAR10(tmp_path, flip=True, seed=1)
    plain = CIFAR10(tmp_path)
    imgs = [a[i]["image"] for i in range(20)]
    assert all(torch.equal(x, b[i]["image"]) for i, x in enumerate(imgs))
    flipped = [not torch.equal(x, plain[i]["image"]) for i, x in enumerate(imgs)]
    assert 0 < sum(flipped) < 20
    assert all(torch.equal(x, plain[i]["image"].flip(-1)) for i, x in enumerate(imgs) if flipped[i])


# ---- digits ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # importing scikit-learn takes seconds; the dataset itself reads sklearn's file without it
def test_digits_match_scikit_learn():
    from sklearn.datasets import load_digits

    ref = load_digits()
    everything = Digits(8, "all")
    assert len(everything) == 1797
    for i in (0, 123, 1796):
        expected = torch.tensor(ref.images[i] / 8.0 - 1, dtype=torch.float32)
        assert torch.allclose(everything[i]["image"][0], expected)
        assert everything[i]["label"] == ref.target[i]


def test_digits_values_split_and_sizes():
    train, test = Digits(8, "train"), Digits(8, "test")
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert not set(train.source_index) & set(test.source_index)
    assert np.array_equal(Digits(8, "test").source_index, test.source_index)  # deterministic
    assert set(train.targets.tolist()) == set(range(10))
    assert train.images.min() == -1 and train.images.max() == 1
    d16 = Digits(16, "train")
    x = d16[0]["image"]
    assert x.shape == (1, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert d16[0]["label"] == train[0]["label"] and d16[0]["caption"].startswith("a handwritten")
    padded = Digits(16, "train", resize="pad")[0]["image"]
    assert torch.equal(padded[:, 4:12, 4:12], train[0]["image"]) and torch.all(padded[:, :4] == -1)
    assert torch.equal(Digits(8, "all")[int(test.source_index[5])]["image"], test[5]["image"])
    with pytest.raises(ValueError, match="size"):
        Digits(4)


def test_digits_without_scikit_learn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"latentdiff\[demo\]"):
        Digits(8)


# ---- registry ----------------------------------------------------------------------------------------------


def test_make_dataset_by_name_mapping_and_config(tmp_path):
    from latentdiff.config import DataSection

    assert isinstance(make_dataset("digits", size=16), Digits)
    assert len(make_dataset({"name": "digits", "split": "test"})) == 359
    save(tmp_path / "a.png")
    ds = make_dataset(DataSection(name="folder", root=str(tmp_path), size=8, channels=1, flip=True))
    assert isinstance(ds, ImageFolder) and ds[0]["image"].shape == (1, 8, 8) and ds.flip
    write_fake_cifar(tmp_path / "c")
    assert len(make_dataset("cifar10", root=str(tmp_path / "c"), split="test")) == 4


def test_make_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*digits"):
        make_dataset("mnist")
    with pytest.raises(ValueError, match="does not use the setting 'flip'"):
        make_dataset("digits", flip=True)
    with pytest.raises(ValueError, match="needs the setting 'root'"):
        make_dataset("folder", size=8)
    with pytest.raises(ValueError, match="no split 'all'"):
        make_dataset("cifar10", root=str(tmp_path), split="all")
    with pytest.raises(ValueError, match="has channels 1"):
        make_dataset("digits", channels=3)
    with pytest.raises(TypeError, match="bad option"):
        make_dataset("digits", colour=True)
