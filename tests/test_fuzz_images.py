"""Bad image files and metadata, fuzzed (issue 17, item 5). An image folder holding truncated PNG and JPEG files
(at seeded cut points), files of random bytes and zero bytes under image names, decompression bombs, and images
in every mode a user meets (16-bit, palette with and without transparency, CMYK, alpha, bilevel): each bad file
is skipped and counted (or, for a JPEG whose header survived, replaced at load with a warning and counted), and
each good one is converted to exactly the pixels computed here from its own array. ``metadata.jsonl`` lines that
point outside the folder (``..``, an absolute path, a symlink out) are refused with one line naming the line."""

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.data.folder import ImageFolder
from latentdiff.errors import DataError

CUTS = 6      # truncation points per format
GARBAGE = 4   # files of random bytes
SIDE = 16


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)


def _expected(arr: np.ndarray) -> torch.Tensor:
    """(C, H, W) in [-1, 1] of a uint8 (H, W, C) array: the folder's mapping, written out here."""
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------------------
# Unreadable files: skipped with a count


def test_truncated_garbage_empty_and_bomb_files_are_skipped_and_counted(tmp_path, monkeypatch, caplog):
    rng = random.Random(5)
    good = _rgb(0)
    Image.fromarray(good).save(tmp_path / "good.png")
    png = (tmp_path / "good.png").read_bytes()
    Image.fromarray(_rgb(1)).save(tmp_path / "source.jpg", quality=90)
    jpg = (tmp_path / "source.jpg").read_bytes()
    (tmp_path / "source.jpg").unlink()
    bad = {}
    for i, cut in enumerate(sorted(rng.sample(range(1, len(png) - 1), CUTS))):
        (tmp_path / f"cut{i}.png").write_bytes(png[:cut])
        bad[f"cut{i}.png"] = "truncated png"
    jpg_cuts = sorted(rng.sample(range(1, len(jpg) - 2), CUTS))
    for i, cut in enumerate(jpg_cuts):
        (tmp_path / f"cut{i}.jpg").write_bytes(jpg[:cut])
    for i in range(GARBAGE):
        (tmp_path / f"noise{i}.{rng.choice(['png', 'jpg', 'webp'])}").write_bytes(rng.randbytes(rng.randint(1, 400)))
        bad[f"noise{i}"] = "random bytes"
    for ext in ("png", "jpg"):
        (tmp_path / f"empty.{ext}").write_bytes(b"")
        bad[f"empty.{ext}"] = "zero bytes"
    # Decompression bombs, made small by lowering PIL's limit: a 64x64 image against a limit of 1000 pixels is
    # over 2x (PIL raises), a 40x40 one is between 1x and 2x (PIL only warns; the folder refuses it too).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb_big.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "bomb_small.png")
    bad["bomb_big.png"] = bad["bomb_small.png"] = "decompression bomb"

    with caplog.at_level(logging.WARNING, logger="latentdiff.data.folder"):
        ds = ImageFolder(tmp_path, SIDE, captions="none", labels="none")
    names = {Path(p).name for p in ds.paths}
    skipped_jpg = CUTS - sum(n.startswith("cut") and n.endswith(".jpg") for n in names)
    assert "good.png" in names and not any(n.startswith(("cut", "noise", "empty", "bomb")) and not n.endswith(".jpg")
                                           for n in names - {"good.png"})
    assert ds.num_skipped == len(bad) + skipped_jpg
    assert f"skipped {ds.num_skipped} unreadable image(s)" in caplog.text
    assert "exceeds limit of 1000 pixels" in caplog.text or "decompression bomb" in caplog.text.lower()
    # JPEG cuts that kept their header pass the check and are replaced when loaded, with a warning and a count.
    kept_jpg = [i for i, p in enumerate(ds.paths) if p.name.endswith(".jpg")]
    replaced = [i for i in kept_jpg if ds[i]["path"] != str(ds.paths[i])]
    assert ds.num_failed == len(replaced) and (not replaced or "could not decode" in caplog.text)
    assert all(Path(ds[i]["path"]).name == "good.png" or i not in replaced for i in kept_jpg)
    assert torch.equal(ds[[p.name for p in ds.paths].index("good.png")]["image"], _expected(good))
    print(f"\nimage fuzz: {CUTS} truncated PNG, {CUTS} truncated JPEG ({skipped_jpg} skipped at build, "
          f"{ds.num_failed} replaced at load), {GARBAGE} random-byte files, 2 zero-byte files, 2 bombs")


# ----------------------------------------------------------------------------------------------------------
# Modes: converted correctly


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.round(rgb * a + 255.0 * (1 - a)).astype(np.uint8)


def _grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, as PIL's L conversion computes it (integer, rounded)."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _mode_cases(tmp: Path):
    """(file name, expected (H, W, 3) uint8 array, tolerance in levels) per mode."""
    rgb = _rgb(2)
    grey16 = np.random.default_rng(3).integers(0, 65536, (SIDE, SIDE), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp / "grey16.png")  # mode I;16
    yield "grey16.png", np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, axis=2), 0
    Image.fromarray(rgb).save(tmp / "rgb.png")
    yield "rgb.png", rgb, 0
    grey = _grey(rgb)
    Image.fromarray(grey).save(tmp / "grey.png")
    yield "grey.png", np.repeat(grey[..., None], 3, axis=2), 0
    alpha = np.random.default_rng(4).integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp / "rgba.png")
    yield "rgba.png", _over_white(rgb, alpha), 1
    Image.fromarray(np.dstack([grey, alpha])).save(tmp / "la.png")  # LA
    yield "la.png", np.repeat(_over_white(grey[..., None], alpha), 3, axis=2), 1
    palette = Image.fromarray(rgb).quantize(colors=16, method=Image.Quantize.MEDIANCUT)
    palette.save(tmp / "palette.png")
    yield "palette.png", np.asarray(palette.convert("RGB")), 0
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    transparent.save(tmp / "palette_alpha.png", transparency=0)
    idx = np.asarray(palette)
    yield "palette_alpha.png", np.where((idx == 0)[..., None], 255, np.asarray(palette.convert("RGB"))), 0
    bilevel = Image.fromarray(grey > 128)  # mode 1
    bilevel.save(tmp / "bilevel.png")
    yield "bilevel.png", np.repeat(np.where(grey > 128, 255, 0).astype(np.uint8)[..., None], 3, axis=2), 0
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp / "cmyk.jpg", quality=100)
    yield "cmyk.jpg", np.asarray(Image.open(tmp / "cmyk.jpg").convert("RGB")), 0


def test_every_image_mode_is_converted_to_the_right_pixels(tmp_path):
    cases = list(_mode_cases(tmp_path))
    ds = ImageFolder(tmp_path, SIDE, channels=3, captions="none", labels="none")
    assert ds.num_skipped == 0 and len(ds) == len(cases)
    by_name = {Path(p).name: i for i, p in enumerate(ds.paths)}
    for name, expected, tol in cases:
        got = ds[by_name[name]]["image"]
        assert got.shape == (3, SIDE, SIDE), name
        diff = ((got - _expected(expected)).abs().max() * 127.5).item()
        assert diff <= tol + 1e-3, (name, diff)
    grey_ds = ImageFolder(tmp_path, SIDE, channels=1, captions="none", labels="none")
    assert grey_ds[by_name["grey16.png"]]["image"].shape == (1, SIDE, SIDE)
    print(f"\nimage modes converted: {len(cases)} ({', '.join(n for n, _, _ in cases)})")


# ----------------------------------------------------------------------------------------------------------
# metadata.jsonl paths that leave the folder


def _folder_with(tmp: Path, name: str) -> Path:
    root = tmp / "data"
    root.mkdir()
    Image.fromarray(_rgb(0)).save(root / "inside.png")
    (tmp / "outside.png").write_bytes((root / "inside.png").read_bytes())
    (tmp / "secret").mkdir()
    Image.fromarray(_rgb(1)).save(tmp / "secret" / "x.png")
    (root / "link.png").symlink_to(tmp / "outside.png")
    (root / "linkdir").symlink_to(tmp / "secret", target_is_directory=True)
    lines = [{"file_name": "inside.png", "text": "fine"}, {"file_name": name, "text": "escape"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return root


ESCAPES = ["../outside.png", "./../outside.png", "sub/../../outside.png", "link.png", "linkdir/x.png",
           "ABSOLUTE/outside.png", "ABSOLUTE/data/../outside.png"]


@pytest.mark.parametrize("name", ESCAPES)
def test_metadata_that_points_outside_the_folder_is_refused(name, tmp_path):
    name = name.replace("ABSOLUTE", str(tmp_path))
    root = _folder_with(tmp_path, name)
    with pytest.raises(DataError) as err:
        ImageFolder(root, SIDE, captions="metadata")
    msg = str(err.value)
    assert "\n" not in msg and f"metadata.jsonl:2: file_name {name!r} points outside the dataset folder" in msg


def test_metadata_inside_the_folder_is_still_read(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.fromarray(_rgb(0)).save(tmp_path / "sub" / "inside.png")
    (tmp_path / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "./x/../inside.png", "text": "ok"}))
    ds = ImageFolder(tmp_path, SIDE, captions="metadata", labels="none")
    assert ds.captions == ["ok"]
