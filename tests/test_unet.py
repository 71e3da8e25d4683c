"""The U-Net (latentdiff.nn.unet): shapes, conditioning, zero init, checkpointing, errors, parity with diffusers."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.interop.unet_keys import unet_key_map
from latentdiff.nn.attention import AttentionBlock, SpatialTransformer
from latentdiff.nn.layers import ResBlock, SinusoidalEmbedding, group_norm_silu
from latentdiff.nn.unet import PRESETS, UNet, UNetConfig, unet_from_preset

from helpers.tiny_sd import randomise

TINY = PRESETS["tiny"]
CONFIGS = {
    "tiny": TINY,
    "adm": dataclasses.replace(
        TINY, channel_mult=(1, 2, 2), use_scale_shift_norm=True, resblock_updown=True, head_channels=8,
        num_classes=5, dropout=0.1, out_channels=2,
    ),
    "ldm": dataclasses.replace(
        TINY, in_channels=4, out_channels=4, attention_resolutions=(1, 2), context_dim=12, transformer_depth=2,
        use_linear_proj=True, concat_channels=2,
    ),
    "sd1_like": dataclasses.replace(TINY, in_channels=4, out_channels=4, num_heads=4, context_dim=12),
}  # fmt: skip


def _inputs(cfg: UNetConfig, b: int, h: int, w: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, h, w, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    kw = {}
    if cfg.num_classes is not None:
        kw["y"] = torch.randint(0, cfg.num_classes + 1, (b,), generator=g)
    if cfg.context_dim is not None:
        kw["context"] = torch.randn(b, 5, cfg.context_dim, generator=g)
    if cfg.concat_channels:
        kw["concat"] = torch.randn(b, cfg.concat_channels, h, w, generator=g)
    return x, t, kw


def _perturb_zero_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every all-zero parameter (zero-initialised outputs, norm biases) small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _nparams(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------------------------
# Shapes, sizes, zero init


@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_shape_at_several_sizes_and_zero_at_init(name):
    cfg = CONFIGS[name]
    model = UNet(cfg).eval()
    for h, w in [(8, 8), (8, 16)]:  # square, non-square
        x, t, kw = _inputs(cfg, 2, h, w)
        with torch.no_grad():
            out = model(x, t, **kw)
        assert out.shape == (2, cfg.out_channels, h, w)
        assert torch.count_nonzero(out) == 0  # zero-initialised output conv
    _perturb_zero_init(model)
    x, t, kw = _inputs(cfg, 2, 24, 16)  # larger than both sizes above, non-square
    with torch.no_grad():
        out = model(x, t, **kw)
    assert out.shape == (2, cfg.out_channels, 24, 16) and torch.isfinite(out).all() and out.abs().max() > 0


def test_preset_digits_runs_on_8x8_and_16x16():
    model = unet_from_preset("digits").eval()
    for s in (8, 16):
        with torch.no_grad():
            out = model(torch.randn(3, 1, s, s), torch.tensor([0, 10, 999]), y=torch.tensor([0, 9, 10]))
        assert out.shape == (3, 1, s, s)


def test_fractional_and_scalar_timesteps():
    model = _perturb_zero_init(UNet(TINY)).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a = model(x, torch.tensor([10.0, 10.0]))
        b = model(x, 10)
        c = model(x, torch.tensor([10.5, 10.5]))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_channels_last_inference_matches_the_autograd_path():
    cfg = CONFIGS["ldm"]
    model = _perturb_zero_init(UNet(cfg)).eval()
    x, t, kw = _inputs(cfg, 2, 8, 16)
    with_grad = model(x, t, **kw)  # NCHW path
    with torch.no_grad():
        fast = model(x, t, **kw)  # channels_last path on CPU
        model.channels_last_inference = False
        plain = model(x, t, **kw)
    assert fast.is_contiguous() and fast.shape == plain.shape
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(with_grad.detach(), plain, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Conditioning changes the output


def test_timestep_class_context_and_concat_change_the_output():
    cfg = dataclasses.replace(CONFIGS["ldm"], num_classes=3)
    model = _perturb_zero_init(UNet(cfg)).eval()
    x, t, kw = _inputs(cfg, 2, 8, 8)
    with torch.no_grad():
        ref = model(x, t, **kw)
        variants = {
            "t": model(x, t + 100, **kw),
            "y": model(x, t, **{**kw, "y": (kw["y"] + 1) % 4}),
            "null class": model(x, t, **{**kw, "y": torch.full_like(kw["y"], 3)}),
            "context": model(x, t, **{**kw, "context": torch.randn_like(kw["context"])}),
            "concat": model(x, t, **{**kw, "concat": torch.randn_like(kw["concat"])}),
        }
    for what, out in variants.items():
        assert (out - ref).abs().max() > 1e-4, f"changing {what} did not change the output"


def test_context_length_may_vary():
    cfg = CONFIGS["sd1_like"]
    model = _perturb_zero_init(UNet(cfg)).eval()
    x, t, _ = _inputs(cfg, 2, 8, 8)
    with torch.no_grad():
        for length in (1, 7, 77):
            assert model(x, t, context=torch.randn(2, length, 12)).shape == (2, 4, 8, 8)


# ------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing, fused GroupNorm + SiLU


@pytest.mark.parametrize("name", ["adm", "ldm"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    cfg = CONFIGS[name]
    grads, outs = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = _perturb_zero_init(UNet(dataclasses.replace(cfg, use_checkpoint=ckpt))).train()
        x, t, kw = _inputs(cfg, 2, 8, 8)
        torch.manual_seed(1)  # same dropout masks in both runs
        out = model(x, t, **kw)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)
    assert any(g.abs().max() > 0 for g in grads[0].values())


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_group_norm_silu_matches_plain_ops(modulated, channels_last):
    norm = nn.GroupNorm(4, 8).double()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(3, 8, 5, 6, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    scale = torch.randn(3, 8, 1, 1, dtype=torch.float64, requires_grad=True) if modulated else None
    shift = torch.randn(3, 8, 1, 1, dtype=torch.float64, requires_grad=True) if modulated else None
    inputs = [x, norm.weight, norm.bias] + ([scale, shift] if modulated else [])

    def plain():
        h = norm(x)
        return F.silu(h * (1 + scale) + shift if modulated else h)

    grad = torch.randn(3, 8, 5, 6, dtype=torch.float64)
    fused = group_norm_silu(x, norm, scale, shift)
    g_fused = torch.autograd.grad(fused, inputs, grad)
    ref = plain()
    g_ref = torch.autograd.grad(ref, inputs, grad)
    torch.testing.assert_close(fused, ref)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b)


def test_pixel_norm_unet_is_local_and_not_exportable_to_diffusers():
    """norm "pixel" and no middle attention: no GroupNorm is left, the network trains (gradients reach every norm),
    and the output at one end of a wide latent does not depend on the far end, while a GroupNorm U-Net's does;
    diffusers has no such U-Net, so export refuses it."""
    from latentdiff.errors import CheckpointError
    from latentdiff.interop.unet_keys import unet_config_to_diffusers
    from latentdiff.nn.layers import PixelNorm

    cfg = dataclasses.replace(CONFIGS["ldm"], use_scale_shift_norm=True, attention_resolutions=(), mid_attention=False)
    outs = {}
    for norm in ("pixel", "group"):
        torch.manual_seed(0)
        model = _perturb_zero_init(UNet(dataclasses.replace(cfg, norm=norm))).eval()
        x, t, kw = _inputs(model.config, 1, 8, 256)
        far = x.clone()
        far[..., 192:] = torch.randn(1, x.shape[1], 8, 64)
        kw = {**kw, "concat": torch.zeros(1, 2, 8, 256)}
        with torch.no_grad():
            outs[norm] = (model(x, t, **kw)[..., :32] - model(far, t, **kw)[..., :32]).abs().max()
        if norm == "pixel":
            assert not any(isinstance(m, nn.GroupNorm) for m in model.modules())
            model(x, t, **kw).square().mean().backward()
            norms = [m for m in model.modules() if isinstance(m, PixelNorm)]
            assert norms and all(m.weight.grad is not None for m in norms)
    assert outs["pixel"] < 1e-6 < outs["group"]
    with pytest.raises(CheckpointError, match="norm pixel"):
        unet_config_to_diffusers(dataclasses.replace(CONFIGS["sd1_like"], norm="pixel"), 8)
    with pytest.raises(CheckpointError, match="no middle attention"):
        unet_config_to_diffusers(dataclasses.replace(CONFIGS["sd1_like"], mid_attention=False), 8)
    attn = UNet(dataclasses.replace(CONFIGS["ldm"], norm="pixel"))  # attention blocks take the pixel norm too
    assert not any(isinstance(m, nn.GroupNorm) for m in attn.modules())
    assert not any(isinstance(m, (AttentionBlock, SpatialTransformer)) for m in UNet(cfg).modules())
    with pytest.raises(ValueError, match="norm must be group or pixel"):
        dataclasses.replace(TINY, norm="layer")


def test_sinusoidal_embedding_is_cos_then_sin():
    emb = SinusoidalEmbedding(8)
    t = torch.tensor([0.0, 3.0, 999.0, 2.5])
    out = emb(t)
    freqs = [10000 ** (-k / 4) for k in range(4)]
    for i, ti in enumerate(t.tolist()):
        expected = [math.cos(ti * f) for f in freqs] + [math.sin(ti * f) for f in freqs]
        torch.testing.assert_close(out[i], torch.tensor(expected, dtype=torch.float32), atol=2e-5, rtol=1e-5)
    assert "freqs" not in emb.state_dict()  # a recomputable buffer, not a checkpoint entry
    assert SinusoidalEmbedding(7)(t).shape == (4, 7)


# ------------------------------------------------------------------------------------------------------------------
# Parameter counts and presets


def test_cifar10_preset_has_the_ddpm_parameter_count():
    with torch.device("meta"):
        n = _nparams(unet_from_preset("cifar10"))
    print(f"cifar10 preset: {n:,} parameters")
    assert abs(n - 35.7e6) / 35.7e6 < 0.01


def test_presets_and_overrides():
    model = unet_from_preset("tiny", num_classes=4, out_channels=2)
    assert model.config.num_classes == 4 and model.label_emb.num_embeddings == 5  # + null class
    assert model.out_conv.out_channels == 2
    assert PRESETS["tiny"].num_classes is None  # the preset itself is untouched
    with pytest.raises(ValueError, match="unknown UNet preset 'nope'"):
        unet_from_preset("nope")
    with pytest.raises(ValueError, match="UNet preset 'tiny': unknown key 'widht'"):
        unet_from_preset("tiny", widht=3)
    with pytest.raises(ValueError, match="UNetConfig: unknown key 'bogus'"):
        UNetConfig.from_dict({"bogus": 1})
    cfg = UNetConfig.from_dict({**TINY.to_dict(), "channel_mult": [1, 2]})  # YAML lists become tuples
    assert cfg == TINY


# ------------------------------------------------------------------------------------------------------------------
# Bad inputs and configs


def test_bad_inputs_raise_clear_errors():
    cfg = dataclasses.replace(CONFIGS["ldm"], num_classes=3)
    model = UNet(cfg)
    x, t, kw = _inputs(cfg, 2, 8, 8)
    cases = [
        (dict(x=torch.randn(2, 3, 8, 8)), "x has 3 channels, this UNet expects in_channels=4"),
        (dict(x=torch.randn(2, 4, 8)), "x must be a \\(B, C, H, W\\) tensor"),
        (dict(x=torch.randn(2, 4, 9, 8), concat=torch.randn(2, 2, 9, 8)), "input size 9x8 is not divisible by 2"),
        (dict(t=torch.zeros(3)), "t must have shape \\(2,\\)"),
        (dict(y=None), "y is required"),
        (dict(y=torch.tensor([0, 4])), "class ids in \\[0, 3\\]"),
        (dict(y=torch.tensor([0.0, 1.0])), "y must be a \\(2,\\) long tensor"),
        (dict(context=None), "context is required"),
        (dict(context=torch.randn(2, 5, 13)), "context must be \\(2, L, 12\\)"),
        (dict(concat=None), "concat is required"),
        (dict(concat=torch.randn(2, 3, 8, 8)), "concat must have shape \\(2, 2, 8, 8\\)"),
    ]
    for change, message in cases:
        args = {"x": x, "t": t, **kw, **change}
        with pytest.raises(ValueError, match=message):
            model(args.pop("x"), args.pop("t"), **args)
    plain = UNet(TINY)
    for extra, message in [
        (dict(y=torch.tensor([0, 1])), "not class-conditional"),
        (dict(context=torch.randn(2, 3, 4)), "no cross-attention"),
        (dict(concat=torch.randn(2, 1, 8, 8)), "no concatenated channels"),
    ]:
        with pytest.raises(ValueError, match=message):
            plain(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), **extra)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="width 48 is not divisible by num_groups=32"):
        UNetConfig(model_channels=48)
    with pytest.raises(ValueError, match="attention_resolutions \\[16\\] are not downsampling factors"):
        UNetConfig(attention_resolutions=(16,))
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        UNet(dataclasses.replace(TINY, num_heads=3))
    with pytest.raises(ValueError, match="not divisible by head_channels=12"):
        UNet(dataclasses.replace(TINY, head_channels=12))
    with pytest.raises(ValueError, match="model_channels must be a positive integer"):
        UNetConfig(model_channels=0)
    with pytest.raises(ValueError, match="channel_mult must be a sequence of integers"):
        UNetConfig(channel_mult="124")
    with pytest.raises(ValueError, match="num_heads must be a positive integer or -1"):
        UNetConfig(num_heads=0)
    with pytest.raises(TypeError, match="expects a UNetConfig"):
        UNet({"model_channels": 16})
    # Small widths work with a matching num_groups.
    assert UNet(UNetConfig(model_channels=8, channel_mult=(1, 2), num_groups=4)) is not None


# ------------------------------------------------------------------------------------------------------------------
# Parity with diffusers (an independent implementation), weights copied by name


def _copy(dst: nn.Module, src: nn.Module, done: set):
    for name in ("weight", "bias"):
        d, s = getattr(dst, name, None), getattr(src, name, None)
        if d is None:
            assert s is None, f"{type(src).__name__}.{name} has no counterpart"
            continue
        d.data.copy_(s.data.reshape(d.shape))
        done.add(d)


def _copy_resblock(ours: ResBlock, theirs, done):
    pairs = [("norm1", "norm1"), ("conv1", "conv1"), ("emb_proj", "time_emb_proj"), ("norm2", "norm2")]
    pairs.append(("conv2", "conv2"))
    if not isinstance(ours.skip, nn.Identity):
        pairs.append(("skip", "conv_shortcut"))
    for a, b in pairs:
        _copy(getattr(ours, a), getattr(theirs, b), done)


def _copy_attention(ours, theirs, done):
    if isinstance(ours, AttentionBlock):  # diffusers Attention with a group norm
        _copy(ours.norm, theirs.group_norm, done)
        _copy(ours.proj_out, theirs.to_out[0], done)
        h, d = ours.heads, ours.head_dim
        for name in ("weight", "bias"):  # legacy qkv layout: rows [head, (q, k, v), head_dim]
            q, k, v = (getattr(m, name).data for m in (theirs.to_q, theirs.to_k, theirs.to_v))
            stacked = torch.stack([q.unflatten(0, (h, d)), k.unflatten(0, (h, d)), v.unflatten(0, (h, d))], dim=1)
            getattr(ours.qkv, name).data.copy_(stacked.flatten(0, 2))
            done.add(getattr(ours.qkv, name))
        return
    assert isinstance(ours, SpatialTransformer)  # diffusers Transformer2DModel
    for a in ("norm", "proj_in", "proj_out"):
        _copy(getattr(ours, a), getattr(theirs, a), done)
    for ob, tb in zip(ours.blocks, theirs.transformer_blocks, strict=True):
        for a in ("norm1", "norm2", "norm3"):
            _copy(getattr(ob, a), getattr(tb, a), done)
        for a in ("attn1", "attn2"):
            oa, ta = getattr(ob, a), getattr(tb, a)
            for p in ("to_q", "to_k", "to_v"):
                _copy(getattr(oa, p), getattr(ta, p), done)
            _copy(oa.to_out, ta.to_out[0], done)
        _copy(ob.ff.geglu.proj, tb.ff.net[0].proj, done)
        _copy(ob.ff.proj_out, tb.ff.net[2], done)


def _copy_from_diffusers(ours: UNet, theirs) -> None:
    done: set = set()
    _copy(ours.time_embed[0], theirs.time_embedding.linear_1, done)
    _copy(ours.time_embed[2], theirs.time_embedding.linear_2, done)
    if ours.label_emb is not None:
        _copy(ours.label_emb, theirs.class_embedding, done)
    _copy(ours.input_blocks[0][0], theirs.conv_in, done)
    i = 1
    for down in theirs.down_blocks:
        for j, res in enumerate(down.resnets):
            _copy_resblock(ours.input_blocks[i][0], res, done)
            if getattr(down, "attentions", None):
                _copy_attention(ours.input_blocks[i][1], down.attentions[j], done)
            i += 1
        if down.downsamplers:
            layer, src = ours.input_blocks[i][0], down.downsamplers[0]
            _copy_resblock(layer, src, done) if isinstance(layer, ResBlock) else _copy(layer.op, src.conv, done)
            i += 1
    mid = theirs.mid_block
    _copy_resblock(ours.middle_block[0], mid.resnets[0], done)
    _copy_attention(ours.middle_block[1], mid.attentions[0], done)
    _copy_resblock(ours.middle_block[2], mid.resnets[1], done)
    k = 0
    for up in theirs.up_blocks:
        for j, res in enumerate(up.resnets):
            block = ours.output_blocks[k]
            _copy_resblock(block[0], res, done)
            if getattr(up, "attentions", None):
                _copy_attention(block[1], up.attentions[j], done)
            if j == len(up.resnets) - 1 and up.upsamplers:
                layer, src = block[-1], up.upsamplers[0]
                _copy_resblock(layer, src, done) if isinstance(layer, ResBlock) else _copy(layer.conv, src.conv, done)
            k += 1
    _copy(ours.out_norm, theirs.conv_norm_out, done)
    _copy(ours.out_conv, theirs.conv_out, done)
    missing = [n for n, p in ours.named_parameters() if p not in done]
    assert not missing, f"parameters without a diffusers counterpart: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ddpm", "adm"])
def test_matches_diffusers_unet2d(variant):
    from diffusers import UNet2DModel

    adm = variant == "adm"
    cfg = UNetConfig(
        in_channels=3, out_channels=6 if adm else 3, model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
        attention_resolutions=(2,), num_heads=1, head_channels=8 if adm else -1, use_scale_shift_norm=adm,
        resblock_updown=adm, num_classes=4 if adm else None, num_groups=8,
    )  # fmt: skip
    down, up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if adm else ("DownBlock2D", "UpBlock2D")
    torch.manual_seed(0)
    theirs = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=cfg.out_channels, block_out_channels=(16, 32, 32),
        layers_per_block=1, down_block_types=(down, "AttnDownBlock2D", down),
        up_block_types=(up, "AttnUpBlock2D", up), attention_head_dim=8 if adm else None,
        norm_num_groups=8, resnet_time_scale_shift="scale_shift" if adm else "default",
        downsample_type="resnet" if adm else "conv", upsample_type="resnet" if adm else "conv",
        num_class_embeds=5 if adm else None, flip_sin_to_cos=True, freq_shift=0,
    ).eval()  # fmt: skip
    if adm:  # diffusers' mid block drops the attention GroupNorm when scale_shift is on; ADM has it: add it back
        mid_attn = theirs.mid_block.attentions[0]
        mid_attn.group_norm = nn.GroupNorm(8, 32, eps=1e-5)
    randomise(theirs, 1)  # every norm weight and bias too: a swapped or unmapped one changes the output
    ours = UNet(cfg).eval()
    assert _nparams(ours) == _nparams(theirs)
    _copy_from_diffusers(ours, theirs)
    x, t = torch.randn(2, 3, 16, 24), torch.tensor([3, 870])
    y = torch.tensor([1, 4]) if adm else None
    with torch.no_grad():
        expected = theirs(x, t, class_labels=y).sample
        got = ours(x, t, y=y)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("linear", [False, True])
def test_matches_diffusers_unet2d_condition(linear):
    from diffusers import UNet2DConditionModel

    cfg = UNetConfig(
        in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(1, 2), num_heads=-1 if linear else 2, head_channels=8 if linear else -1,
        context_dim=12, transformer_depth=2 if linear else 1, use_linear_proj=linear, num_groups=8,
    )  # fmt: skip
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
        attention_head_dim=(2, 4) if linear else 2,  # diffusers' "head dim" here is the head count (SD convention)
        transformer_layers_per_block=cfg.transformer_depth, use_linear_projection=linear, norm_num_groups=8,
    ).eval()  # fmt: skip
    randomise(theirs, 2)  # every norm weight and bias too: a swapped or unmapped one changes the output
    ours = UNet(cfg).eval()
    assert _nparams(ours) == _nparams(theirs)
    names, state = unet_key_map(cfg, "diffusers"), theirs.state_dict()  # the importer's key map
    ours.load_state_dict({k: state[names[k]].reshape(v.shape) for k, v in ours.state_dict().items()})
    x, t, ctx = torch.randn(2, 4, 8, 16), torch.tensor([5, 640]), torch.randn(2, 7, 12)
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, context=ctx)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        block = ours.middle_block[1].blocks[0]  # the test sees the norms: swapping two changes the output
        block.norm2.weight, block.norm3.weight = block.norm3.weight, block.norm2.weight
        assert (ours(x, t, context=ctx) - expected).abs().max() > 1e-2


@pytest.mark.slow
def test_parameter_counts_match_diffusers_for_ddpm_and_stable_diffusion():
    from diffusers import UNet2DConditionModel, UNet2DModel

    sd = dict(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )  # fmt: skip
    with torch.device("meta"):
        pairs = {
            "cifar10": UNet2DModel(
                sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
            ),
            "sd1": UNet2DConditionModel(**sd, cross_attention_dim=768, attention_head_dim=8),
            "sd2": UNet2DConditionModel(
                **sd, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
            ),
        }  # fmt: skip
        for name, theirs in pairs.items():
            assert _nparams(unet_from_preset(name)) == _nparams(theirs), name
