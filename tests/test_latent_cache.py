"""The latent cache (data/latent_cache.py): built once, reused, rebuilt when its key changes or it is damaged."""

import json
import os

import pytest
import torch

from latentdiff.data.latent_cache import LatentDataset, autoencoder_hash, build_or_load_latent_cache
from latentdiff.nn.autoencoder import Autoencoder, AutoencoderConfig, load_autoencoder, save_autoencoder

IDENTITY = {"data": {"name": "toy", "size": 8}, "length": 10, "split": "train", "seed": 0}


class Toy(torch.utils.data.Dataset):
    """Items like the shapes world's: an image, a caption, an int label, a tensor field, and an object."""

    def __init__(self, n=10, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand((n, 3, 8, 8), generator=g) * 2 - 1
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": self.images[i], "caption": f"a red circle nº{i}", "label": i % 3,
                "cells": torch.arange(9) * i, "opaque": object()}


def tiny_ae(regularizer="kl", seed=0):
    torch.manual_seed(seed)
    cfg = AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, resolution=8, z_channels=2,
                            embed_dim=2, regularizer=regularizer, n_embed=16)
    return Autoencoder(cfg).eval()


def count_calls(ae):
    """Wrap the encoder's entry point; returns a list that gets one entry (the batch size) per call."""
    calls, inner = [], ae.encode_moments

    def wrapped(x):
        calls.append(x.shape[0])
        return inner(x)

    ae.encode_moments = wrapped
    return calls


def build(ae, root, identity=IDENTITY, data=None, **kw):
    with pytest.warns(UserWarning, match="opaque"):  # the object field is skipped, with a warning, on a build
        return build_or_load_latent_cache(data or Toy(), ae, root=root, identity=identity, batch_size=4, **kw)


def load(ae, root, identity=IDENTITY, data=None, **kw):
    return build_or_load_latent_cache(data or Toy(), ae, root=root, identity=identity, batch_size=4, **kw)


def test_built_once_then_reused(tmp_path):
    ae = tiny_ae()
    calls = count_calls(ae)
    first = build(ae, tmp_path)
    assert sum(calls) == 10 and len(first) == 10
    calls.clear()
    again = load(ae, tmp_path)
    assert calls == []  # the encoder never ran
    assert again.folder == first.folder and [p.name for p in tmp_path.iterdir()] == [first.folder.name]
    torch.testing.assert_close(again.mean, first.mean, rtol=0, atol=0)
    torch.testing.assert_close(again.std, first.std, rtol=0, atol=0)
    meta = json.loads((first.folder / "meta.json").read_text(encoding="utf-8"))
    assert meta["key"]["identity"] == IDENTITY and meta["count"] == 10 and meta["latent_shape"] == [2, 4, 4]


def test_items_keep_the_condition_fields(tmp_path):
    data = Toy()
    ds = build(tiny_ae(), tmp_path, data=data)
    reread = load(tiny_ae(), tmp_path, data=data)
    for cache in (ds, reread):
        item = cache[7]
        assert set(item) == {"latent", "caption", "label", "cells"}  # no image, no opaque object
        assert item["caption"] == "a red circle nº7" and item["label"] == 1
        assert torch.equal(item["cells"], torch.arange(9) * 7)
        assert item["latent"].shape == (2, 4, 4) and item["latent"].dtype == torch.float32


def test_rebuilt_when_the_weights_change_not_when_their_file_does(tmp_path):
    ae = tiny_ae()
    first = build(ae, tmp_path / "cache")
    save_autoencoder(ae, str(tmp_path / "a"))
    save_autoencoder(ae, str(tmp_path / "elsewhere" / "b"))
    a, b = load_autoencoder(str(tmp_path / "a")), load_autoencoder(str(tmp_path / "elsewhere" / "b"))
    assert autoencoder_hash(a) == autoencoder_hash(b) == autoencoder_hash(ae)
    calls = count_calls(b)
    assert load(b, tmp_path / "cache").folder == first.folder and calls == []

    with torch.no_grad():
        b.encoder.conv_in.weight.add_(0.05)
    changed = build(b, tmp_path / "cache")
    assert sum(calls) == 10 and changed.folder != first.folder
    assert not torch.allclose(changed.mean, first.mean)
    torch.testing.assert_close(changed.mean, b.encode(Toy().images, sample=False))


def test_rebuilt_when_the_identity_or_mode_changes(tmp_path):
    ae = tiny_ae()
    first = build(ae, tmp_path)
    calls = count_calls(ae)
    other = build(ae, tmp_path, identity={**IDENTITY, "seed": 1})
    assert sum(calls) == 10 and other.folder != first.folder
    calls.clear()
    mean = build(ae, tmp_path, mode="mean")
    assert sum(calls) == 10 and mean.folder not in (first.folder, other.folder) and mean.std is None
    with pytest.raises(TypeError, match="JSON-able"):
        load(ae, tmp_path, identity={"data": object()})
    with pytest.raises(ValueError, match="mode"):
        load(ae, tmp_path, mode="median")


def test_mean_mode_returns_exactly_the_encoder_mean(tmp_path):
    ae = tiny_ae()
    data = Toy()
    ds = build_or_load_latent_cache(data, ae, root=tmp_path, identity=IDENTITY, mode="mean", batch_size=10,
                                    fields=["label"])
    expected = ae.encode(data.images, sample=False)
    assert ds.mode == "mean" and ds.std is None and ds.fields == ["label"]
    assert torch.equal(torch.stack([ds[i]["latent"] for i in range(10)]), expected)
    assert torch.equal(ds[3]["latent"], ds[3]["latent"])  # no noise in mean mode
    reread = load(ae, tmp_path, mode="mean", fields=["label"])
    assert torch.equal(reread.mean, expected)


def test_sample_mode_draws_fresh_latents_with_the_posterior_statistics(tmp_path):
    ae = tiny_ae()
    ds = build(ae, tmp_path, mode="sample")
    post = ae.posterior(Toy().images)
    torch.testing.assert_close(ds.mean, post.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ds.std, post.std, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ds[0]["latent"], ds[0]["latent"])  # a fresh z = μ + σ·ε per access
    z = torch.stack([ds[2]["latent"] for _ in range(4000)])
    torch.testing.assert_close(z.mean(0), post.mean[2], atol=4 * post.std[2].max().item() / 4000 ** 0.5, rtol=0)
    torch.testing.assert_close(z.std(0), post.std[2], rtol=0.08, atol=0)
    # The generator can be saved and restored, so a resumed run repeats the draws.
    state = ds.generator.get_state()
    a = ds[5]["latent"]
    ds.generator.set_state(state)
    assert torch.equal(ds[5]["latent"], a)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(ds.get(1, generator=g1)["latent"], ds.get(1, generator=g2)["latent"])


def test_latents_are_not_scaled(tmp_path):
    ae = tiny_ae()
    ae.latent_scale = 7.5
    ds = build(ae, tmp_path, mode="mean")
    torch.testing.assert_close(ds.mean, ae.encode(Toy().images, sample=False))
    ae.latent_scale = 0.2  # a new scale keeps the cache valid
    calls = count_calls(ae)
    assert load(ae, tmp_path, mode="mean").folder == ds.folder and calls == []


def test_pool_limits_the_dataset_to_its_first_items(tmp_path):
    ae = tiny_ae()
    calls = count_calls(ae)
    ds = build(ae, tmp_path, pool=6, mode="mean")
    assert len(ds) == 6 and sum(calls) == 6
    torch.testing.assert_close(ds.mean, ae.encode(Toy().images[:6], sample=False))
    assert [ds[i]["caption"] for i in range(6)] == [f"a red circle nº{i}" for i in range(6)]
    calls.clear()
    assert len(build(ae, tmp_path, pool=7, mode="mean")) == 7 and sum(calls) == 7  # another pool, another cache
    assert len(build(ae, tmp_path, pool=1000, mode="mean")) == 10  # more than the dataset has: all of it
    with pytest.raises(ValueError, match="pool"):
        load(ae, tmp_path, pool=0)


def _truncate(folder):
    p = folder / "latents.safetensors"
    p.write_bytes(p.read_bytes()[:100])


def _flip_a_byte(folder):
    p = folder / "latents.safetensors"
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0xFF
    p.write_bytes(bytes(raw))


def _drop_meta(folder):
    (folder / "meta.json").unlink()


def _garble_meta(folder):
    (folder / "meta.json").write_text("{not json")


def _other_key(folder):
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    meta["key"]["identity"] = {"something": "else"}
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte, _drop_meta, _garble_meta, _other_key])
def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path, damage):
    ae = tiny_ae()
    first = build_or_load_latent_cache(Toy(), ae, root=tmp_path, identity=IDENTITY, mode="mean", fields=["label"])
    damage(first.folder)
    calls = count_calls(ae)
    with pytest.warns(UserWarning, match="unusable"):
        rebuilt = build_or_load_latent_cache(Toy(), ae, root=tmp_path, identity=IDENTITY, mode="mean", fields=["label"])
    assert sum(calls) == 10 and rebuilt.folder == first.folder
    torch.testing.assert_close(rebuilt.mean, first.mean)
    calls.clear()
    assert torch.equal(load(ae, tmp_path, mode="mean", fields=["label"]).mean, rebuilt.mean) and calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.folder.name]  # no temporary or old folder left


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        build(tiny_ae(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_vq_caches_the_latent_that_encode_returns(tmp_path):
    ae = tiny_ae("vq")
    ds = build(ae, tmp_path, mode="sample")
    assert ds.mode == "mean" and ds.key["mode"] == "mean"  # no posterior to sample
    assert torch.equal(ds[0]["latent"], ds[0]["latent"])
    torch.testing.assert_close(ds.mean, ae.encode(Toy().images))


def test_bad_items_are_named(tmp_path):
    ae = tiny_ae()

    class NoImage(Toy):
        def __getitem__(self, i):
            return {"picture": self.images[i]}

    class Ragged(Toy):
        def __getitem__(self, i):
            return {"image": self.images[i], "boxes": torch.zeros(i % 2 + 1, 4)}

    with pytest.raises(ValueError, match="item 0 .*'image'"):
        load(ae, tmp_path, data=NoImage())
    with pytest.raises(ValueError, match="field 'boxes' of item 1"):
        load(ae, tmp_path, data=Ragged())
    with pytest.raises(KeyError, match="'missing'"):
        load(ae, tmp_path, fields=["missing"])
    with pytest.raises(TypeError, match="'opaque'"):
        load(ae, tmp_path, fields=["opaque"])
    assert not os.listdir(tmp_path)


def test_latent_dataset_index_errors():
    ds = LatentDataset(torch.zeros(3, 2, 4, 4))
    assert torch.equal(ds[-1]["latent"], torch.zeros(2, 4, 4))
    with pytest.raises(IndexError, match="3 cached items"):
        ds[3]



def test_dataloader_workers_draw_different_reproducible_noise():
    ds = LatentDataset(torch.zeros(8, 1, 1, 1), torch.ones(8, 1, 1, 1), seed=0)  # latent = ε

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, generator=g)
        return torch.cat([b["latent"].flatten() for b in loader])

    a = draws(0)
    assert len(set(a.tolist())) == 8  # copies of one generator in two workers would repeat each other
    assert torch.equal(a, draws(0)) and not torch.equal(a, draws(1))
