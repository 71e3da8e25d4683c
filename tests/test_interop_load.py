"""Import and export of Stable Diffusion checkpoints (latentdiff.interop): the networks of a diffusers folder give
diffusers' outputs; single files (CompVis keys, EMA weights, OpenCLIP text towers) load; bad files fail in one line
naming the file; ours -> diffusers -> ours and ours -> SD file -> ours are bit-identical; diffusers reads our
exports."""

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

import latentdiff  # noqa: E402
from latentdiff.errors import CheckpointError, MissingFileError  # noqa: E402
from latentdiff.interop import convert, detect_format, load, save  # noqa: E402
from latentdiff.interop.clip import openclip_to_transformers  # noqa: E402

from helpers.clitools import run_cli  # noqa: E402
from helpers.tiny_sd import build  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {layout: build(root / layout, layout) for layout in ("sd1", "sd2", "inpaint")}


class Payload:
    """An object that only a full unpickle rebuilds (what a .ckpt with training state holds)."""


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------------------------
# The networks of an imported folder against diffusers' own


@pytest.mark.parametrize("layout", ["sd1", "sd2", "inpaint"])
def test_imported_networks_match_diffusers(folders, layout):
    folder = folders[layout]
    pipe = latentdiff.load(folder)
    assert detect_format(folder) == "diffusers"
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 8, generator=g), torch.randn(2, 7, 32, generator=g)
    concat = torch.randn(2, 5, 16, 8, generator=g) if layout == "inpaint" else None
    t = torch.tensor([3, 871])
    with torch.no_grad():
        theirs = unet(torch.cat([x, concat], 1) if concat is not None else x, t, encoder_hidden_states=ctx).sample
        ours = pipe.unet(x, t, context=ctx, concat=concat)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        img = torch.rand(2, 3, 32, 16, generator=g) * 2 - 1
        post, ref = pipe.autoencoder.posterior(img), vae.encode(img).latent_dist
        torch.testing.assert_close(post.mean, ref.mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(post.logvar, ref.logvar, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pipe.autoencoder.decode(x), vae.decode(x).sample, rtol=1e-4, atol=1e-4)
    assert pipe.latent_scale == pytest.approx(0.18215)
    assert pipe.diffusion.prediction == ("v" if layout == "sd2" else "eps")
    assert pipe.unet.config.use_linear_proj == (layout == "sd2")


def test_the_parity_sees_a_swapped_norm(folders):
    """Randomised norms make the U-Net parity sensitive to a swapped layer (norm2 <-> norm3 in a transformer)."""
    pipe = latentdiff.load(folders["sd1"])
    unet = diffusers.UNet2DConditionModel.from_pretrained(folders["sd1"] / "unet").eval()
    block = pipe.unet.middle_block[1].blocks[0]
    with torch.no_grad():
        block.norm2.weight, block.norm3.weight = block.norm3.weight, block.norm2.weight
        x, ctx, t = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32), torch.tensor([500])
        diff = (pipe.unet(x, t, context=ctx) - unet(x, t, encoder_hidden_states=ctx).sample).abs().max()
    assert diff > 1e-3


# ------------------------------------------------------------------------------------------------------------------
# Round trips and exports that diffusers reads


def test_round_trips_are_bit_identical(folders, tmp_path):
    src = folders["sd1"]
    convert(src, tmp_path / "ours")  # diffusers -> latentdiff
    assert detect_format(tmp_path / "ours") == "latentdiff"
    summary = convert(tmp_path / "ours", tmp_path / "back", format="diffusers")
    assert summary == {**summary, "from": "latentdiff", "to": "diffusers", "unet_tensors": 304}
    for part, name in [("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                       ("text_encoder", "model.safetensors")]:
        assert _same_state(load_file(src / part / name), load_file(tmp_path / "back" / part / name)), part
    vocab = "tokenizer/vocab.json"
    assert (src / vocab).read_bytes() == (tmp_path / "back" / vocab).read_bytes()
    ours = load(tmp_path / "ours")
    save(ours, tmp_path / "model.safetensors", "sd")
    again = load(tmp_path / "model.safetensors")
    for a, b in ((ours.unet, again.unet), (ours.autoencoder, again.autoencoder), (ours.conditioner, again.conditioner)):
        assert _same_state(a.state_dict(), b.state_dict())
    assert again.config.sample == ours.config.sample and again.config.diffusion == ours.config.diffusion


def test_diffusers_reads_our_exports(folders, tmp_path):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folders["sd2"], safety_checker=None)
    pipe = load(folders["sd2"])
    save(pipe, tmp_path / "sd2.safetensors", "sd")
    single = diffusers.StableDiffusionPipeline.from_single_file(
        str(tmp_path / "sd2.safetensors"), config=str(folders["sd2"]), local_files_only=True, safety_checker=None)
    save(pipe, tmp_path / "folder", "diffusers")
    folder = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "folder", safety_checker=None)
    assert folder.scheduler.config.prediction_type == "v_prediction"
    for other in (single, folder):
        for part in ("unet", "vae", "text_encoder"):
            assert _same_state(getattr(ref, part).state_dict(), getattr(other, part).state_dict()), part


def test_inpainting_exports_as_the_inpaint_pipeline(folders, tmp_path):
    save(load(folders["inpaint"]), tmp_path / "inp", "diffusers")
    assert json.loads((tmp_path / "inp" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionInpaintPipeline"
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "inp", safety_checker=None)
    assert pipe.unet.config.in_channels == 9


def test_models_without_a_diffusers_equivalent_are_refused(tmp_path):
    from latentdiff.config import Config, DataSection
    from latentdiff.pipeline import Pipeline

    pipe = Pipeline.from_config(Config(model={"preset": "tiny"}, data=DataSection(name="digits", size=8, channels=1)))
    for fmt, out in (("diffusers", tmp_path / "d"), ("sd", tmp_path / "m.safetensors")):
        with pytest.raises(CheckpointError, match="CLIP text encoder"):
            save(pipe, out, fmt)
        assert not out.exists()


# ------------------------------------------------------------------------------------------------------------------
# Single files: EMA weights, .ckpt, OpenCLIP text towers, the tokenizer


def _compvis_file(folder: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A third-party style SD single file (no latentdiff metadata) made from our exporter's tensors."""
    from safetensors import safe_open

    save(load(folder), tmp_path / "ours.safetensors", "sd")
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:
        return tmp_path / "plain.safetensors", {k: f.get_tensor(k) for k in f.keys()}


def test_a_plain_single_file_with_ema_weights_and_a_ckpt(folders, tmp_path):
    path, state = _compvis_file(folders["sd1"], tmp_path)
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + 1 for k, v in state.items()
           if k.startswith("model.diffusion_model.")}
    state.update(ema, **{"model_ema.num_updates": torch.tensor(3), "model_ema.decay": torch.tensor(0.9999)})
    save_file(state, str(path))
    with pytest.raises(MissingFileError, match="holds no tokenizer"):
        load(path)
    tok = folders["sd1"] / "tokenizer"
    # SD 1.x heads (8) and widths come from SD's conventions; the tiny model has its own, so give its config
    # through the latentdiff metadata route instead: here only the key handling is under test.
    with pytest.raises(CheckpointError, match="cross-attention width 32"):
        load(path, tokenizer=tok)
    torch.save({"state_dict": state}, tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointError, match="cross-attention width 32"):
        load(tmp_path / "plain.ckpt", tokenizer=tok)
    from latentdiff.interop.single_file import _unet_state, read_single_file

    pipe = load(folders["sd1"])
    got = _unet_state(read_single_file(tmp_path / "plain.ckpt")[0], pipe.unet.config, "x", ema=True)
    raw = _unet_state(state, pipe.unet.config, "x", ema=False)
    assert all(torch.equal(got[k], raw[k] + 1) for k in raw)  # EMA copies used when present


def test_openclip_text_tower_converts_to_the_transformers_model(folders):
    """SD 2.x single files hold OpenCLIP's text tower; converted (fused in_proj split, last block dropped) it is the
    same CLIP text model."""
    pipe = load(folders["sd2"])
    hf = pipe.conditioner.file_state()
    n = pipe.conditioner.text_model.config.num_hidden_layers
    oc = {"token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
          "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
          "ln_final.weight": hf["text_model.final_layer_norm.weight"],
          "ln_final.bias": hf["text_model.final_layer_norm.bias"]}
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1",
             "mlp.c_proj": "mlp.fc2"}
    for i in range(n + 1):  # one extra block: SD 2.x drops the last
        j = min(i, n - 1)
        for a, b in names.items():
            for leaf in ("weight", "bias"):
                oc[f"transformer.resblocks.{i}.{a}.{leaf}"] = hf[f"text_model.encoder.layers.{j}.{b}.{leaf}"]
        for leaf in ("weight", "bias"):
            oc[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = torch.cat(
                [hf[f"text_model.encoder.layers.{j}.self_attn.{p}_proj.{leaf}"] for p in "qkv"])
    assert _same_state(openclip_to_transformers(oc), {k: v for k, v in hf.items()})


# ------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file, nothing written


def test_bad_checkpoints_fail_naming_the_file(folders, tmp_path):
    import shutil

    bad = tmp_path / "truncated"
    shutil.copytree(folders["sd1"], bad)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=f"{weights}.*truncated or corrupt"):
        load(bad)
    single = tmp_path / "cut.safetensors"
    single.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable safetensors"):
        load(single)

    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Payload()}, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match="pickled.ckpt: this .ckpt needs a full unpickle"):
        load(tmp_path / "pickled.ckpt")
    no_unet = tmp_path / "no_unet"
    shutil.copytree(folders["sd1"], no_unet, ignore=shutil.ignore_patterns("unet"))
    with pytest.raises(MissingFileError, match="no_unet.*has no unet/|no_unet.*without unet/"):
        load(no_unet)


def test_unsupported_architectures_say_what_was_detected(folders, tmp_path):
    import shutil

    xl = tmp_path / "xl"
    shutil.copytree(folders["sd1"], xl)
    cfg = json.loads((xl / "unet" / "config.json").read_text())
    (xl / "unet" / "config.json").write_text(json.dumps({**cfg, "addition_embed_type": "text_time"}))
    with pytest.raises(CheckpointError, match="SDXL U-Net"):
        load(xl)
    (xl / "unet" / "config.json").write_text(json.dumps({**cfg, "class_embed_type": "timestep"}))
    with pytest.raises(CheckpointError, match="class_embed_type='timestep'"):
        load(xl)
    save_file({"conditioner.embedders.0.transformer.w": torch.zeros(1),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(CheckpointError, match="SDXL checkpoint"):
        load(tmp_path / "xl.safetensors")
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match=r"no Stable Diffusion U-Net .* top-level keys are \['encoder'\]"):
        load(tmp_path / "vae.safetensors")


def test_cli_convert_export_and_sample(folders, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "convert", folders["sd1"], tmp_path / "ours")
    assert rc == 0 and "U-Net 304 tensors" in out and "(diffusers)" in out, err
    rc, out, err = run_cli(capsys, "export", tmp_path / "ours", tmp_path / "ours.safetensors", "--format", "sd")
    assert rc == 0 and (tmp_path / "ours.safetensors").is_file(), err
    rc, out, err = run_cli(capsys, "sample", tmp_path / "ours.safetensors", "--prompt", "a red circle", "--steps", "2",
                           "--num", "1", "--out", tmp_path / "x.png", "--quiet")
    assert rc == 0 and (tmp_path / "x.png").is_file(), err
    rc, out, err = run_cli(capsys, "convert", tmp_path / "nothing", tmp_path / "o2")
    assert rc == 2 and err.count("\n") == 1 and "does not exist" in err
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("preset", ["sd1", "sd2"])
def test_single_file_architecture_is_read_from_the_shapes(preset):
    """A third-party file has no config: the SD 1.x / 2.x U-Net and the SD first stage are recovered from shapes."""
    from latentdiff.interop.single_file import infer_unet_config, infer_vae_config
    from latentdiff.interop.unet_keys import unet_key_map
    from latentdiff.nn.autoencoder import Autoencoder, AutoencoderConfig
    from latentdiff.nn.unet import PRESETS, UNet

    cfg = PRESETS[preset]
    with torch.device("meta"):
        state = UNet(cfg).state_dict()
        vae_cfg = AutoencoderConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, embed_dim=4,
                                    resolution=512)
        vae_state = Autoencoder(vae_cfg).state_dict()
    names = unet_key_map(cfg, "compvis")
    assert infer_unet_config({names[k]: v for k, v in state.items()}, "x") == cfg
    assert infer_vae_config(vae_state) == vae_cfg


def test_cli_sample_of_an_inpainting_model_is_one_line(folders, capsys):
    rc, out, err = run_cli(capsys, "sample", folders["inpaint"], "--prompt", "a red circle", "--steps", "1")
    assert rc == 2 and err.count("\n") == 1 and "inpainting model" in err and "editing.generate" in err
