"""Evaluation: FID / KID / IS / precision-recall, PSNR / SSIM, statistics cache, floor, FID Inception, oracle."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from latentdiff.eval import (
    FeatureStats,
    OracleConfig,
    compare,
    dataset_identity,
    extract_stats,
    fid,
    files_fingerprint,
    frechet_distance,
    image_batches,
    inception_score,
    kid,
    load_oracle,
    load_stats,
    mmd2_unbiased,
    precision_recall,
    psnr,
    quantize_8bit,
    real_floor,
    reference_stats,
    save_oracle,
    split_stats,
    ssim,
)
from latentdiff.eval.oracle import Oracle, digits_arrays, stratified_split, train_digits_oracle
from latentdiff.nn import inception as inc


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run small or single-image forward passes: on the shared, busy CPUs two OpenMP threads made
    the Inception forward ~10x slower than one (measured 9.5 s vs 0.7 s per 299x299 image)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian(n, mean, cov, seed):
    rng = np.random.default_rng(seed)
    return rng.multivariate_normal(mean, cov, size=n)


def random_spd(d, seed):
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def population_fid(mu1, s1, mu2, s2):
    """Closed form with an eigen-decomposition (independent of scipy.linalg.sqrtm):
    Tr((S1 S2)^{1/2}) = Tr((S1^{1/2} S2 S1^{1/2})^{1/2}), all symmetric PSD."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


# ---------------------------------------------------------------------------------------------- FeatureStats / FID

def test_feature_stats_streaming_matches_numpy_even_with_large_offset():
    x = gaussian(1000, np.full(6, 1e4), random_spd(6, 1), seed=2)
    s = FeatureStats(max_kept=300)
    for chunk in np.array_split(x, 7):
        s.update(torch.from_numpy(chunk))
    assert s.n == 1000
    np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.cov, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-8)
    assert s.features.shape == (300, 6) and s.features.dtype == np.float32
    r = FeatureStats.from_moments(s.n, s.mean, s.cov, s.features)
    np.testing.assert_allclose(r.cov, s.cov, rtol=1e-12)
    with pytest.raises(ValueError, match="dimension"):
        s.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="NaN"):
        s.update(np.full((2, 6), np.nan))


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric():
    rng = np.random.default_rng(0)
    a = rng.exponential(size=(400, 12))          # non-Gaussian on purpose
    b = rng.normal(0.3, 1.5, size=(300, 12))
    assert abs(fid(a, a)) < 1e-6
    ab, ba = fid(a, b), fid(b, a)
    assert ab > 1.0
    assert ab == pytest.approx(ba, rel=1e-6)


def test_frechet_distance_equals_closed_form_for_exact_moments():
    d = 5
    mu1, mu2 = np.arange(d, dtype=float), np.ones(d)
    # diagonal: sum (s1 + s2 - 2 sqrt(s1 s2)) = sum (sqrt(s1) - sqrt(s2))^2
    s1, s2 = np.diag([1.0, 4.0, 9.0, 0.25, 2.0]), np.diag([4.0, 1.0, 1.0, 1.0, 2.0])
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10)
    # general (non-commuting) covariances
    s1, s2 = random_spd(d, 3), random_spd(d, 4)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(population_fid(mu1, s1, mu2, s2), rel=1e-8)


def test_fid_estimate_from_samples_matches_population_value():
    d = 4
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 0.25])
    s1, s2 = random_spd(d, 5), random_spd(d, 6)
    want = population_fid(mu1, s1, mu2, s2)
    got = fid(gaussian(40000, mu1, s1, 7), gaussian(40000, mu2, s2, 8))
    assert got == pytest.approx(want, abs=0.02 + 0.02 * want)


def test_frechet_distance_handles_singular_covariances():
    # rank-deficient covariances (fewer samples than dimensions) must still give a finite number
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        v = fid(a, b)
    assert np.isfinite(v) and v > 0
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------------------------- KID

def test_mmd2_unbiased_matches_a_direct_double_sum():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3)) + 0.5

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / 30
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    c = rng.normal(size=(600, 8)) * 1.3 + 0.5
    same_mean, same_std = kid(a, b, num_subsets=50, subset_size=200)
    diff_mean, diff_std = kid(a, c, num_subsets=50, subset_size=200)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert diff_mean > 10 * max(abs(same_mean), 1e-3) and diff_mean > 5 * diff_std


# ---------------------------------------------------------------------------------------------- IS

def test_inception_score_uniform_is_one_and_confident_balanced_is_num_classes():
    k = 10
    assert inception_score(probs=np.full((200, k), 1.0 / k), splits=4)[0] == pytest.approx(1.0, abs=1e-12)
    labels = np.arange(200) % k                      # every split holds every class equally
    onehot = np.eye(k)[labels]
    mean, std = inception_score(probs=onehot, splits=4)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    assert inception_score(logits=50.0 * onehot, splits=4)[0] == pytest.approx(k, rel=1e-6)
    # one class only: confident but not diverse -> 1
    assert inception_score(probs=np.eye(k)[np.zeros(50, int)], splits=1)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        inception_score(probs=np.full((4, 3), 0.5))


# ---------------------------------------------------------------------------------------------- precision / recall

def test_precision_recall_identical_sets_are_one_and_far_sets_zero():
    x = np.random.default_rng(3).normal(size=(300, 5))
    assert precision_recall(x, x.copy(), k=3, batch_size=64) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_hand_example_and_mode_dropping():
    # 1-D, k = 1. real 0, 1, 3: radii 1, 1, 2. fake 4.5 (inside ball of 3), 6 (outside): precision 1/2.
    # fake radii 1.5, 1.5: only real 3 lies within 1.5 of 4.5: recall 1/3.
    real, fake = np.array([[0.0], [1.0], [3.0]]), np.array([[4.5], [6.0]])
    p, r = precision_recall(real, fake, k=1)
    assert p == pytest.approx(0.5) and r == pytest.approx(1 / 3)
    # a generator that drops one of two modes: high precision, recall about one half
    rng = np.random.default_rng(4)
    real = np.concatenate([rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 20])
    fake = rng.normal(size=(200, 2))
    p, r = precision_recall(real, fake, k=3)
    assert p > 0.9 and 0.4 < r < 0.55


# ---------------------------------------------------------------------------------------------- PSNR / SSIM

def test_psnr_identical_infinite_and_known_noise():
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert torch.isinf(psnr(x, x)).all()
    a = 0.1
    sign = torch.where(torch.rand_like(x) < 0.5, -1.0, 1.0)
    got = psnr(x, x + a * sign)                      # MSE = a^2 exactly
    torch.testing.assert_close(got, torch.full((3,), 10 * math.log10(4 / a ** 2), dtype=torch.float64))


def test_ssim_identical_is_one_constant_images_closed_form_and_noise_lowers_it():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    # constant images: variances and covariance vanish -> (2 c1 c2 + C1) / (c1^2 + c2^2 + C1)
    c1, c2, big_c1 = 0.2, -0.4, (0.01 * 2) ** 2
    want = (2 * c1 * c2 + big_c1) / (c1 ** 2 + c2 ** 2 + big_c1)
    got = ssim(torch.full((1, 1, 20, 20), c1), torch.full((1, 1, 20, 20), c2))
    assert got.item() == pytest.approx(want, rel=1e-9)
    small = ssim(x, x + 0.05 * torch.randn_like(x))
    large = ssim(x, x + 0.5 * torch.randn_like(x))
    assert (large < small).all() and (small < 1).all()
    assert ssim(x[:, :1, :8, :8], x[:, :1, :8, :8] + 0.1).shape == (2,)  # smaller than the window
    with pytest.raises(ValueError, match="shape"):
        ssim(x, x[:, :, :8])


# ----------------------------------------------------------------------------------------- extraction, cache, floor

class TinyNet(nn.Module):
    """A feature network for tests: pooled conv features and logits; counts images seen."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(1, 6, 3)
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.seen = 0

    def features_and_logits(self, x):
        self.seen += len(x)
        f = torch.tanh(self.conv(x)).mean(dim=(2, 3))
        return f, self.fc(f)

    def fingerprint(self):
        return "tiny:" + inc.state_dict_hash(self.state_dict())


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": i % 3}


def test_extract_stats_same_for_tensor_dataset_and_batches():
    images = torch.rand(37, 1, 8, 8) * 2 - 1
    net = TinyNet()
    a = extract_stats(net, images, batch_size=10)
    b = extract_stats(net, DictDataset(images), batch_size=7)
    c = extract_stats(net, ({"image": x} for x in images.split(5)))
    for s in (b, c):
        assert s.n == 37
        np.testing.assert_allclose(s.mean, a.mean, rtol=1e-6)
        np.testing.assert_allclose(s.features, a.features, rtol=1e-5)
        np.testing.assert_allclose(s.logits, a.logits, rtol=1e-5)
    part = extract_stats(net, DictDataset(images), indices=range(5, 15), max_items=4)
    assert part.n == 4
    np.testing.assert_allclose(part.features, a.features[5:9], rtol=1e-5)
    with pytest.raises(ValueError, match="NaN"):
        extract_stats(net, torch.full((2, 1, 8, 8), float("nan")))
    assert len(list(image_batches(images, 16))) == 3


def test_quantize_8bit_is_on_the_255_grid_and_clamps():
    q = quantize_8bit(torch.tensor([-2.0, -1.0, 0.0, 0.3, 1.0, 5.0]))
    levels = (q + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert q.min() == -1 and q.max() == 1


def test_reference_stats_cached_reused_and_recomputed_when_identity_changes(tmp_path):
    images = torch.rand(40, 1, 8, 8) * 2 - 1
    net = TinyNet()
    ident = dataset_identity("toy", size=40, resolution=8, split="train")
    s1 = reference_stats(net, images, dataset_id=ident, cache_dir=tmp_path)
    files = sorted(tmp_path.iterdir())
    assert net.seen == 40 and len(files) == 1 and files[0].suffix == ".npz"
    s2 = reference_stats(net, images, dataset_id=ident, cache_dir=tmp_path)
    assert net.seen == 40                                  # reused, no forward pass
    np.testing.assert_array_equal(s2.mean, s1.mean)
    np.testing.assert_allclose(s2.cov, s1.cov, rtol=1e-12)
    np.testing.assert_array_equal(s2.features, s1.features)
    np.testing.assert_array_equal(s2.logits, s1.logits)
    meta = load_stats(files[0])[1]
    assert meta["dataset"]["name"] == "toy" and meta["network"] == net.fingerprint()
    # another dataset identity -> recomputed, into another file
    reference_stats(net, images[:30], dataset_id=dataset_identity("toy", 30, 8, "train"), cache_dir=tmp_path)
    assert net.seen == 70 and len(list(tmp_path.iterdir())) == 2
    # another feature network (other weights) -> recomputed
    other = TinyNet(seed=1)
    reference_stats(other, images, dataset_id=ident, cache_dir=tmp_path)
    assert other.seen == 40 and len(list(tmp_path.iterdir())) == 3
    # a corrupt cache file is recomputed with a warning, and no temporary files remain
    files[0].write_bytes(b"not an npz")
    with pytest.warns(RuntimeWarning, match="corrupt"):
        s3 = reference_stats(net, images, dataset_id=ident, cache_dir=tmp_path)
    assert net.seen == 110
    np.testing.assert_allclose(s3.mean, s1.mean, rtol=1e-12)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    with pytest.raises(FileNotFoundError):
        load_stats(tmp_path / "missing.npz")


def test_files_fingerprint_changes_with_content_and_names(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"1")
    b.write_bytes(b"22")
    fp = files_fingerprint([b, a])
    assert fp == files_fingerprint([a, b])                 # order does not matter
    b.write_bytes(b"333")                                  # size (and mtime) change
    assert files_fingerprint([a, b]) != fp
    assert files_fingerprint([a]) != files_fingerprint([a, b])
    with pytest.raises(TypeError):
        dataset_identity("x", 1, 8, transform=object())    # not JSON: cannot key a cache


def test_real_floor_uses_disjoint_splits_and_is_below_a_shifted_model():
    rng = np.random.default_rng(5)
    real = FeatureStats.from_features(rng.normal(size=(800, 6)), logits=rng.normal(size=(800, 4)))
    rest, part = split_stats(real, n=300, seed=1)
    assert (rest.n, part.n) == (500, 300)
    rows = {tuple(r) for r in rest.features} & {tuple(r) for r in part.features}
    assert not rows                                        # disjoint
    floor = real_floor(real, n=300, kid_subsets=20, kid_subset_size=200)
    model = compare(real, FeatureStats.from_features(rng.normal(size=(300, 6)) + 0.7,
                                                     logits=rng.normal(size=(300, 4))),
                    kid_subsets=20, kid_subset_size=200)
    for key in ("fid", "kid_mean", "precision", "recall", "is_mean"):
        assert key in floor and key in model
    assert 0 <= floor["fid"] < 0.2 < model["fid"]
    assert floor["kid_mean"] < model["kid_mean"]
    with pytest.raises(ValueError, match="floor"):
        real_floor(FeatureStats.from_features(rng.normal(size=(10, 6)), max_kept=0))


# ---------------------------------------------------------------------------------------------- FID Inception

def test_fid_inception_layout_matches_the_published_state_dict():
    net = inc.FIDInceptionV3()
    sd = net.state_dict()
    facts = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
             "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1), "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
             "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
             "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
             "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
             "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
             "fc.weight": (1008, 2048), "fc.bias": (1008,)}
    for key, shape in facts.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any("AuxLogits" in k for k in sd)
    # torchvision's Inception3 has 27,161,264 parameters; minus the auxiliary head (3,326,696), plus 8 classes
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049
    # TF-style pooling: the average ignores padding (constant stays constant at the border)
    ones = torch.ones(1, 2, 5, 5)
    torch.testing.assert_close(inc._avg_pool_3x3(ones), ones)
    assert net.Mixed_7c.max_pool and not net.Mixed_7b.max_pool


def _random_fid_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in inc.FIDInceptionV3().state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue                                       # converted TF weights have no such counters
        if k.endswith("running_var"):
            state[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("bn.weight"):
            state[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            state[k] = torch.randn(v.shape, generator=g) * 0.05
    return state


@pytest.mark.slow
def test_fid_inception_loads_a_weights_file_and_gives_2048_features(tmp_path, monkeypatch):
    state = _random_fid_state()
    path = tmp_path / inc.FID_WEIGHTS_NAME
    torch.save(state, path)
    monkeypatch.setenv(inc.FID_WEIGHTS_ENV, str(path))
    net = inc.load_fid_inception()                         # from the environment variable
    torch.testing.assert_close(net.state_dict()["Mixed_6b.branch7x7_2.conv.weight"],
                               state["Mixed_6b.branch7x7_2.conv.weight"])
    assert not net.training
    with torch.no_grad():
        feats = []
        for size in (32, 256):
            x = torch.rand(1, 3, size, size) * 2 - 1
            f, logits = net.features_and_logits(x)
            assert f.shape == (1, 2048) and logits.shape == (1, 1008)
            assert torch.isfinite(f).all() and (f >= 0).all()   # pool3 follows a ReLU
            torch.testing.assert_close(logits, net.fc(f))
            feats.append(f)
        assert not torch.allclose(feats[0], feats[1])
    # the input is resized to 299 bilinearly (align_corners=False), as pytorch-fid does; gray -> RGB
    x = torch.rand(2, 1, 40, 30) * 2 - 1
    want = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    torch.testing.assert_close(net.preprocess(x), want)
    with pytest.raises(ValueError, match="1 or 3"):
        net.preprocess(torch.rand(1, 4, 8, 8))


def test_fid_inception_missing_or_wrong_weights_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(inc.FID_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=inc.FID_WEIGHTS_NAME) as e:
        inc.load_fid_inception()
    assert inc.FID_WEIGHTS_ENV in str(e.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        inc.load_fid_inception(tmp_path / "nope.pth")
    bad = {"foo.weight": torch.zeros(2), "Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 5, 5)}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as e:
        inc.load_fid_inception(tmp_path / "bad.pth")
    msg = str(e.value)
    assert "missing keys: Conv2d_1a_3x3.bn.bias" in msg and "(471 in all)" in msg
    assert "unexpected keys: foo.weight" in msg
    assert "wrong shapes: Conv2d_1a_3x3.conv.weight" in msg
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        inc.load_fid_inception(tmp_path / "junk.pth")


# ---------------------------------------------------------------------------------------------- oracle

def test_oracle_config_save_load_roundtrip_and_input_checks(tmp_path):
    with pytest.raises(ValueError, match="OracleConfig: unknown key 'colour'"):
        OracleConfig.from_dict({"name": "digits", "colour": 3})
    with pytest.raises(FileNotFoundError):
        load_oracle(tmp_path / "none")
    oracle = Oracle(OracleConfig()).eval()
    oracle.info = {"test_accuracy": 0.5}
    save_oracle(oracle, tmp_path / "o")
    back = load_oracle(tmp_path / "o" / "config.json")
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(back.logits(x), oracle.logits(x))
    assert back.fingerprint() == oracle.fingerprint() and back.info["test_accuracy"] == 0.5
    assert back.features(x).shape == (4, oracle.feature_dim)
    up = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)   # nearest 16x16: area pooling undoes it
    torch.testing.assert_close(back.logits(up), back.logits(x))
    assert back.logits(torch.rand(2, 1, 5, 7)).shape == (2, 10)      # smaller / odd sizes are resized too
    with pytest.raises(ValueError, match="expects"):
        back.logits(torch.rand(2, 3, 8, 8))
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    cfg["config"]["num_classes"] = 7
    (tmp_path / "o" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((ValueError, RuntimeError)):
        load_oracle(tmp_path / "o")


@pytest.mark.slow
def test_digits_oracle_trains_to_97_percent_and_reloads(tmp_path, capsys):
    oracle, acc = train_digits_oracle(tmp_path / "digits")
    assert "test accuracy" in capsys.readouterr().out
    assert acc >= 0.97 and oracle.info["n_test"] >= 300
    back = load_oracle(tmp_path / "digits")
    x, y = digits_arrays()
    _, test_idx = stratified_split(y, 0.2, seed=0)
    xt, yt = torch.from_numpy(x[test_idx]), torch.from_numpy(y[test_idx])
    with torch.no_grad():
        assert (back.logits(xt).argmax(1) == yt).float().mean().item() == pytest.approx(acc)
        # the project's digits dataset may present 16x16 images: the oracle resizes them itself
        up = F.interpolate(xt, size=(16, 16), mode="bilinear", align_corners=False)
        assert (back.logits(up).argmax(1) == yt).float().mean().item() >= 0.95
        feats = extract_stats(back, xt).features
    assert feats.shape == (len(test_idx), 128)
