"""First stage: autoencoder shapes per f, KL posterior, VQ, LPIPS, discriminator, the objective, save/load."""

import json
import os

import pytest
import torch

from latentdiff.errors import CheckpointError
from latentdiff.interop.vae_keys import vae_config_to_diffusers
from latentdiff.nn.autoencoder import (
    Autoencoder,
    AutoencoderConfig,
    DiagonalGaussian,
    compute_latent_scale,
    config_for_factor,
    load_autoencoder,
    save_autoencoder,
)
from latentdiff.nn.discriminator import PatchDiscriminator
from latentdiff.nn.lpips import LPIPS, convert_reference_lpips, load_lpips, save_lpips
from latentdiff.nn.quantize import VectorQuantizer
from latentdiff.train.autoencoder_objective import (
    AutoencoderLossConfig,
    AutoencoderObjective,
    adaptive_weight,
    hinge_d_loss,
    psnr,
    ssim,
)


def tiny(f=4, **kw):
    """A few-thousand-parameter autoencoder with downsampling factor f."""
    kw = {"ch": 8, "norm_groups": 4, "num_res_blocks": 1, "resolution": 32, "z_channels": 3, "embed_dim": 3, **kw}
    return Autoencoder(config_for_factor(f, **kw))


@pytest.mark.parametrize("f", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("regularizer", ["kl", "vq"])
def test_encoder_decoder_shapes_for_every_f(f, regularizer):
    ae = tiny(f, regularizer=regularizer, n_embed=16, attn_resolutions=(8,))
    assert ae.f == f and ae.config.f == f
    x = torch.randn(2, 3, 32, 32)
    z = ae.encode(x)
    assert z.shape == (2, 3, 32 // f, 32 // f) == (2, *ae.latent_shape(32, 32))
    assert ae.encoder(x).shape == (2, (6 if regularizer == "kl" else 3), 32 // f, 32 // f)
    assert ae.decode(z).shape == (2, 3, 32, 32)
    x_rec, info = ae(x)
    assert x_rec.shape == x.shape
    assert ("kl" in info) == (regularizer == "kl") and ("perplexity" in info) == (regularizer == "vq")
    # Non-square inputs at other sizes work as long as f divides them.
    assert ae(torch.randn(1, 3, 2 * max(f, 2), 64))[0].shape == (1, 3, 2 * max(f, 2), 64)


def test_f_must_divide_image_size():
    with pytest.raises(ValueError, match="f=16 does not divide resolution 24"):
        config_for_factor(16, resolution=24)
    ae = tiny(8)
    with pytest.raises(ValueError, match="f=8 does not divide the image size 36x36"):
        ae(torch.randn(1, 3, 36, 36))
    with pytest.raises(ValueError, match="power of two"):
        config_for_factor(3)
    with pytest.raises(ValueError, match="unknown autoencoder regularizer"):
        AutoencoderConfig(regularizer="vae")
    with pytest.raises(ValueError, match="norm_groups"):
        AutoencoderConfig(ch=12, norm_groups=8)


def test_layout_names_follow_the_compvis_first_stage():
    names = set(tiny(4, attn_resolutions=(16,)).state_dict())
    for key in ("encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight",
                "encoder.down.1.downsample.conv.weight", "encoder.down.1.attn.0.q.weight",
                "encoder.mid.attn_1.proj_out.weight", "encoder.mid.block_2.conv2.bias", "encoder.norm_out.weight",
                "quant_conv.weight", "post_quant_conv.weight", "decoder.up.2.block.1.conv1.weight",
                "decoder.up.1.upsample.conv.weight", "decoder.up.0.block.0.nin_shortcut.weight",
                "decoder.conv_out.weight"):
        assert key in names, key
    assert "decoder.up.0.upsample.conv.weight" not in names and "encoder.down.2.downsample.conv.weight" not in names


def test_kl_zero_for_standard_normal_and_positive_otherwise():
    zero = DiagonalGaussian(torch.zeros(3, 8, 4, 4))  # μ = 0, log σ² = 0
    assert torch.allclose(zero.kl(), torch.zeros(3), atol=1e-7)
    m = torch.randn(3, 4, 4, 4)
    moments = torch.cat([m, torch.randn(3, 4, 4, 4)], 1)
    post = DiagonalGaussian(moments)
    kl = post.kl()
    assert kl.shape == (3,) and torch.all(kl > 0)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(post.mean, post.std),
                                            torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(kl, ref, rtol=1e-5)
    # Only the variance off: still positive.
    assert torch.all(DiagonalGaussian(torch.cat([torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2, 2), 0.5)], 1)).kl() > 0)
    # Samples are reparameterised and seeded by the generator.
    s1, s2 = post.sample(torch.Generator().manual_seed(1)), post.sample(torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and not torch.equal(s1, post.mode())


def test_vq_straight_through_gradient_reaches_the_encoder():
    ae = tiny(4, regularizer="vq", n_embed=8)
    x = torch.randn(2, 3, 32, 32)
    x_rec, info = ae(x)
    # The decoder saw codebook entries exactly.
    z = ae.encode(x)
    z_q, _ = ae.quantize(z)
    codes = ae.quantize.embedding.weight
    flat = z_q.permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.allclose(flat, codes[info["indices"].flatten()], atol=1e-6)
    # Reconstruction gradient flows through the quantiser into the encoder.
    ae.zero_grad()
    (x_rec - x).pow(2).mean().backward()
    g = ae.encoder.conv_in.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert ae.quantize.embedding.weight.grad is None or ae.quantize.embedding.weight.grad.abs().sum() == 0
    # The codebook loss trains the codebook; the commitment loss trains the encoder.
    ae.zero_grad()
    _, info = ae(x)
    info["codebook_loss"].backward(retain_graph=True)
    assert ae.quantize.embedding.weight.grad.abs().sum() > 0 and ae.encoder.conv_in.weight.grad is None
    ae.zero_grad()
    info["commitment_loss"].backward()
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0
    expected = info["codebook_loss"].item() + 0.25 * info["commitment_loss"].item()
    assert info["vq_loss"].item() == pytest.approx(expected, rel=1e-5)


def test_vq_usage_perplexity_and_dead_code_restart():
    vq = VectorQuantizer(4, 2, usage_decay=0.0, dead_threshold=0.5)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [-100.0, 100.0], [100.0, -100.0]]))
    z = 0.1 * torch.randn(2, 2, 3, 3)  # every vector is nearest to code 0
    vq.eval()
    _, info = vq(z)
    assert info["perplexity"] == pytest.approx(1.0) and info["usage"] == pytest.approx(0.25)
    assert torch.all(info["indices"] == 0)
    vq.train()
    _, info = vq(z)  # codes 1..3 got no assignments: with decay 0 their usage is 0 < 0.5/4, so they restart
    assert vq.restarts == 3
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for row in vq.embedding.weight[1:]:
        assert torch.any(torch.all(torch.isclose(flat, row), dim=1))  # each restarted code is an encoder output
    _, info = vq(z)
    assert info["usage"] > 0.25  # the restarted codes are now used
    # Two equally used codes: perplexity 2.
    vq2 = VectorQuantizer(2, 1, restart_dead=False).eval()
    with torch.no_grad():
        vq2.embedding.weight.copy_(torch.tensor([[-1.0], [1.0]]))
    _, info = vq2(torch.tensor([-1.0, -0.9, 1.0, 0.9]).reshape(1, 1, 2, 2))
    assert info["perplexity"] == pytest.approx(2.0) and info["usage"] == 1.0


def test_adaptive_weight_equals_its_formula():
    """Last layer W (linear): x̂ = W h. With L_rec = mean (x̂ − x)² and L_G = −mean(v ⊙ x̂) the gradients are
    ∂L_rec/∂W = 2/N (x̂ − x) hᵀ and ∂L_G/∂W = −1/N v hᵀ (N = elements of x̂), so λ is known in closed form."""
    torch.manual_seed(0)
    h = torch.randn(5, 4)
    W = torch.randn(3, 4, requires_grad=True)
    x, v = torch.randn(5, 3), torch.randn(5, 3)
    x_hat = h @ W.t()
    rec = (x_hat - x).pow(2).mean()
    g = -(v * x_hat).mean()
    N = x_hat.numel()
    grad_rec = 2.0 / N * (x_hat - x).detach().t() @ h
    grad_g = -1.0 / N * v.t() @ h
    expected = grad_rec.norm() / (grad_g.norm() + 1e-4)
    lam = adaptive_weight(rec, g, W)
    assert lam.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not lam.requires_grad
    assert adaptive_weight((x_hat - x).pow(2).mean(), g, W, max_weight=1e-3).item() == pytest.approx(1e-3)


def test_hinge_loss_and_discriminator():
    d = PatchDiscriminator(ndf=8, n_layers=2)
    out = d(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1, 6, 6)
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0  # confident and right
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="layer")


def test_objective_two_optimizers_and_disc_start():
    ae, disc = tiny(4), PatchDiscriminator(ndf=8, n_layers=2, norm="group")
    obj = AutoencoderObjective(ae, disc, config=AutoencoderLossConfig(disc_start=5, kl_weight=1e-2))
    assert obj.optimizers == {"autoencoder": ["autoencoder"], "discriminator": ["discriminator"]} and obj.ema == []
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    losses, logs = obj.losses({"image": x}, step=0)
    assert set(losses) == {"autoencoder", "discriminator"} and "g_loss" not in logs
    assert losses["discriminator"].item() == 0.0  # off before disc_start
    # Before disc_start the AE loss is L_rec + the weighted KL (per pixel).
    expected = logs["rec_loss"] + 1e-2 * logs["kl"] / x[0].numel()
    assert losses["autoencoder"].item() == pytest.approx(expected, rel=1e-4)
    losses, logs = obj.losses({"image": x}, step=5)
    assert losses["discriminator"].item() > 0 and logs["d_weight"] > 0
    # The discriminator loss trains only the discriminator (inputs detached).
    grads = torch.autograd.grad(losses["discriminator"], [*disc.parameters(), ae.decoder.conv_out.weight],
                                allow_unused=True)
    assert grads[-1] is None and any(g is not None and g.abs().sum() > 0 for g in grads[:-1])
    # Without a discriminator there is one optimizer.
    single = AutoencoderObjective(tiny(4))
    assert single.optimizers == {"autoencoder": ["autoencoder"]} and set(single.models) == {"autoencoder"}


@pytest.mark.slow
def test_training_steps_lower_the_reconstruction_loss(tmp_path):
    from latentdiff.data.shapes import ShapesDataset
    from latentdiff.train import TrainConfig, train

    torch.manual_seed(0)
    ae = tiny(4, ch=16, norm_groups=8)
    obj = AutoencoderObjective(ae, PatchDiscriminator(ndf=8, n_layers=2), config=AutoencoderLossConfig(disc_start=8))
    data = ShapesDataset("train", length=256, size=16, seed=0)
    batch = {"image": torch.stack([data[i]["image"] for i in range(16)])}
    before = obj.evaluate(batch["image"])
    seen = []
    train(obj, data, TrainConfig(steps=12, batch_size=16, lr=2e-3, log_every=4, checkpoint_every=0, ema_decay=0.0),
          tmp_path / "run", progress=False, callback=lambda step, m: seen.append(m))
    after = obj.evaluate(batch["image"])
    assert after["l1"] < 0.8 * before["l1"] and after["psnr"] > before["psnr"]
    assert seen[-1]["rec_loss"] < seen[0]["rec_loss"]
    assert "loss_discriminator" in seen[-1] and "g_loss" in seen[-1]  # the adversarial term switched on at step 8


def test_vq_objective_logs_codebook_statistics():
    ae = tiny(4, regularizer="vq", n_embed=16)
    losses, logs = AutoencoderObjective(ae).losses({"image": torch.randn(2, 3, 32, 32)}, step=0)
    assert {"vq_loss", "perplexity", "usage", "restarts"} <= set(logs)
    assert losses["autoencoder"].item() == pytest.approx(logs["rec_loss"] + logs["vq_loss"], rel=1e-4)


def test_lpips_from_a_local_file(tmp_path):
    net = LPIPS(widths=(4, 8), depths=(1, 1))
    torch.nn.init.uniform_(net.lins[0].weight, 0.1, 1.0)
    torch.nn.init.uniform_(net.lins[1].weight, 0.1, 1.0)
    path = str(tmp_path / "lpips.safetensors")
    save_lpips(net, path)
    loaded = load_lpips(path)
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(loaded(x, y), net(x, y))
    assert torch.allclose(loaded(x, x), torch.zeros(2), atol=1e-6) and torch.all(loaded(x, y) > 0)
    assert not any(p.requires_grad for p in loaded.parameters())
    # The perceptual term enters the objective when a net is given.
    losses, logs = AutoencoderObjective(tiny(4), lpips=loaded).losses({"image": torch.rand(2, 3, 32, 32)}, 0)
    assert "p_loss" in logs and logs["p_loss"] > 0
    with pytest.raises(FileNotFoundError):
        load_lpips(str(tmp_path / "missing.safetensors"))
    with open(path, "r+b") as fh:
        fh.truncate(40)
    with pytest.raises(ValueError, match="corrupt LPIPS"):
        load_lpips(path)
    # The published tensors' names map onto the VGG-16 layout.
    ref = LPIPS().state_dict()
    features = {f"features.{i}.{k}": None for idx in ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
                for i in idx for k in ("weight", "bias")}
    lins = {f"lin{k}.model.1.weight": None for k in range(5)}
    assert set(convert_reference_lpips(features, lins)) == set(ref)


def test_pixel_norm_makes_the_output_depend_only_on_its_receptive_field():
    """With norm "pixel" no statistic spans the canvas: changing a far part of a wide image leaves the
    reconstruction of the near part exactly as it was; GroupNorm's image-wide statistics carry the change
    everywhere (why a GroupNorm first stage shifts its colours on a large canvas)."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 512) * 2 - 1
    far = x.clone()
    far[..., 384:] = torch.rand(1, 3, 16, 128) * 2 - 1
    for norm, same in (("pixel", True), ("group", False)):
        ae = Autoencoder(AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                                           mid_attention=False, norm=norm, resolution=16)).eval()
        with torch.no_grad():
            a, b = ae(x, sample=False)[0][..., :64], ae(far, sample=False)[0][..., :64]
        assert torch.allclose(a, b, atol=1e-6) == same, norm
    pixel = Autoencoder(AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, norm="pixel"))
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in pixel.modules())
    with pytest.raises(CheckpointError, match="no diffusers AutoencoderKL equivalent"):
        vae_config_to_diffusers(pixel.config, 1.0)  # diffusers' AutoencoderKL has GroupNorm only
    with pytest.raises(ValueError, match="norm must be one of group, pixel"):
        AutoencoderConfig(norm="batch")


def test_save_load_roundtrip_with_latent_scale(tmp_path):
    ae = tiny(4, regularizer="vq", n_embed=16).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    scale = compute_latent_scale(ae, x)
    assert (ae.encode(x) * scale).std().item() == pytest.approx(1.0, rel=1e-4)
    save_autoencoder(ae, tmp_path / "ae", latent_scale=scale)
    back = load_autoencoder(str(tmp_path / "ae"))
    assert back.latent_scale == pytest.approx(scale) and back.config == ae.config
    assert torch.allclose(back.eval()(x)[0], ae(x)[0])
    assert sorted(os.listdir(tmp_path / "ae")) == ["config.json", "model.safetensors"]  # no temp files left


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    ae = tiny(2)
    folder = tmp_path / "ae"
    save_autoencoder(ae, folder)
    with pytest.raises(FileNotFoundError, match="folder not found"):
        load_autoencoder(str(tmp_path / "nope"))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupt autoencoder weights"):
        load_autoencoder(str(folder))
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt autoencoder weights"):
        load_autoencoder(str(folder))
    weights.write_bytes(data)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt autoencoder config"):
        load_autoencoder(str(folder))
    (folder / "config.json").write_text(json.dumps({**cfg, "config": {**cfg["config"], "chanels": 4}}))
    with pytest.raises(ValueError, match="unknown key 'config.chanels'"):
        load_autoencoder(str(folder))
    (folder / "config.json").write_text(json.dumps({**cfg, "config": {**cfg["config"], "ch": 16, "norm_groups": 4}}))
    with pytest.raises(ValueError, match="shapes differ"):
        load_autoencoder(str(folder))
    (folder / "config.json").write_text(json.dumps({**cfg, "config": {**cfg["config"], "resolution": 33}}))
    with pytest.raises(ValueError, match="does not divide resolution 33"):
        load_autoencoder(str(folder))
    (folder / "config.json").write_text(json.dumps(cfg))
    os.remove(weights)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_autoencoder(str(folder))


def test_metrics():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.all(psnr(x, x) > 100) and torch.allclose(ssim(x, x).float(), torch.ones(2))
    noisy = x + 0.1 * torch.randn_like(x)
    assert psnr(noisy, x).mean().item() == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.01)).item(), abs=0.5)
    assert torch.all(ssim(noisy, x) < 1)


@pytest.mark.slow
def test_kl_autoencoder_matches_diffusers_by_a_name_mapping():
    """Our layout holds the same math as diffusers' AutoencoderKL (the SD first stage) under a renaming."""
    diffusers = pytest.importorskip("diffusers")
    from latentdiff.interop.vae_keys import is_attention_matrix, vae_key_to_diffusers

    from helpers.tiny_sd import randomise

    cfg = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, resolution=16)
    ours = Autoencoder(cfg).eval()
    theirs = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                     up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                     layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=16).eval()
    randomise(ours, 3)  # every norm weight and bias too: a swapped or unmapped one changes the output
    levels = len(cfg.ch_mult)
    sd = {vae_key_to_diffusers(k, levels): v[:, :, 0, 0] if is_attention_matrix(k) else v  # the importer's map
          for k, v in ours.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        post = ours.posterior(x)
        ref = theirs.encode(x).latent_dist
        assert torch.allclose(post.mean, ref.mean, atol=1e-5) and torch.allclose(post.logvar, ref.logvar, atol=1e-5)
        z = torch.randn(2, 4, 8, 8)
        assert torch.allclose(ours.decode(z), theirs.decode(z).sample, atol=1e-5)
