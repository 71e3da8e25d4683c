"""Conditioners (latentdiff.nn.tokenizer, text_encoder, conditioners) and the U-Net's adm vector input."""

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F

from latentdiff.nn.conditioners import (
    ClassEmbedder,
    Conditioner,
    SpatialRescaler,
    SpatialRescalerConfig,
    build_conditioner,
)
from latentdiff.nn.text_encoder import TextEncoder, TextEncoderConfig
from latentdiff.nn.tokenizer import END_ID, PAD_ID, UNK_ID, WordTokenizer, split_words
from latentdiff.nn.unet import PRESETS, UNet, UNetConfig

CAPTIONS = [
    "a red circle at the top left",
    "a blue square in the centre",
    "A red square at the bottom right, and a green triangle in the centre.",
    "a green circle at the top left",
]


def _tokenizer(context_length=16) -> WordTokenizer:
    return WordTokenizer.build(CAPTIONS, context_length)


def _unet_for(cond: Conditioner, in_channels: int = 4) -> UNet:
    cfg = dataclasses.replace(PRESETS["tiny"], in_channels=in_channels, out_channels=in_channels, **cond.unet_kwargs())
    return UNet(cfg)


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_rules_and_vocabulary_order():
    words = ["a", "red", "circle", "top", "left", "don't", "stop", "3x"]
    assert split_words("A Red circle, top-left! Don't_stop 3x") == words
    tok = _tokenizer()
    assert tok.vocab[:3] == ["<pad>", "<unk>", "<end>"]
    assert (PAD_ID, UNK_ID, END_ID) == (0, 1, 2)
    assert tok.vocab[3] == "a"  # the most frequent word first (6 times)
    assert "," not in tok.vocab and "centre." not in tok.vocab and "centre" in tok.vocab
    assert WordTokenizer.build(reversed(CAPTIONS), 16) == tok  # order of captions does not change the ids
    rare = WordTokenizer.build(CAPTIONS, 16, min_count=2)
    assert "blue" not in rare.vocab and "red" in rare.vocab
    assert rare.encode(["a blue circle"])[0, 1] == UNK_ID


def test_encode_decode_round_trip():
    tok = _tokenizer()
    texts = ["A red circle at the top left", "a green triangle, in the centre", ""]
    tokens = tok.encode(texts)
    assert tokens.shape == (3, 16) and tokens.dtype == torch.long
    assert tok.decode(tokens) == ["a red circle at the top left", "a green triangle in the centre", ""]
    n = len(split_words(texts[0]))
    assert tokens[0, n] == END_ID and (tokens[0, n + 1 :] == PAD_ID).all() and (tokens[0, :n] > END_ID).all()


def test_unknown_word_maps_to_unk_without_error():
    tok = _tokenizer()
    tokens = tok.encode(["a purple hexagon at the top left"])
    assert tokens[0, 1] == UNK_ID and tokens[0, 2] == UNK_ID and tokens[0, 0] == tok.ids["a"]
    assert tok.decode(tokens) == ["a <unk> <unk> at the top left"]


def test_empty_prompt_is_end_then_pads():
    tok = WordTokenizer(_tokenizer().vocab, context_length=5)
    assert tok.encode([""]).tolist() == [[END_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]]
    assert tok.encode([" ,. "]).tolist() == tok.encode([""]).tolist()  # punctuation alone is no word


def test_too_long_prompt_names_both_lengths_and_the_prompt():
    tok = WordTokenizer(_tokenizer().vocab, context_length=4)
    assert tok.encode(["a red circle"]).shape == (1, 4)  # 3 words + end fit exactly
    with pytest.raises(ValueError, match=r"5 tokens.*context length 4.*'a red circle left'"):
        tok.encode(["a red circle left"])
    with pytest.raises(TypeError, match="list of prompts"):
        tok.encode("a red circle")
    with pytest.raises(ValueError, match=r"15 tokens.*context_length=4.*'A red square.*at least 15"):
        WordTokenizer.build(CAPTIONS, 4)
    assert WordTokenizer.build(CAPTIONS).context_length == 15  # None = the longest caption


def test_save_load_round_trip_and_bad_files(tmp_path):
    tok = _tokenizer()
    path = tok.save(tmp_path / "model" / "tokenizer.json")
    assert sorted(os.listdir(tmp_path / "model")) == ["tokenizer.json"]  # atomic: no temporary file left
    again = WordTokenizer.load(path)
    assert again == tok and torch.equal(again.encode(CAPTIONS), tok.encode(CAPTIONS))
    assert WordTokenizer.from_dict(json.loads(json.dumps(tok.to_dict()))) == tok

    def bad(d, pattern):
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(d))
        with pytest.raises(ValueError, match=pattern):
            WordTokenizer.load(p)

    d = tok.to_dict()
    bad({**d, "vocab": d["vocab"] + ["red"]}, r"bad.json.*duplicate entry 'red' at ids \d+ and")
    bad({**d, "vocab": d["vocab"][1:]}, r"bad.json.*must start with the special tokens")
    bad({**d, "vocab": d["vocab"] + ["Red"]}, r"entry \d+ 'Red' is not a lower-case word")
    bad({**d, "context_length": 0}, "context_length must be a positive integer")
    bad({"vocab": d["vocab"]}, r"expected keys \['context_length', 'type', 'vocab'\]")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        WordTokenizer.load(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        WordTokenizer.load(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------------------------------
# Text encoder, class embedder, rescaler


def _text_encoder(tok: WordTokenizer) -> TextEncoder:
    return TextEncoder(TextEncoderConfig(tok.vocab_size, tok.context_length, width=16, depth=2, heads=2)).eval()


def test_text_encoder_output_changes_with_the_prompt():
    tok = _tokenizer()
    enc = _text_encoder(tok)
    out = enc(tok.encode(["a red circle at the top left", "a blue circle at the top left", ""]))
    assert out.shape == (3, 16, 16)
    assert not torch.allclose(out[0], out[1], atol=1e-4)  # one word differs: every position differs
    assert not torch.allclose(out[0, 3:], out[1, 3:], atol=1e-4)  # even after it (attention mixes words)
    assert not torch.allclose(out[0], out[2], atol=1e-4)


def test_text_encoder_ignores_the_pads_beyond_the_end():
    tok = _tokenizer()
    enc = _text_encoder(tok)
    tokens = tok.encode(["a red circle", ""])
    out = enc(tokens)
    # The same prompts with less padding: the outputs at the real tokens (words + end) are unchanged.
    short = enc(tokens[:, :5])
    assert torch.allclose(short[0, :4], out[0, :4], atol=1e-6) and torch.allclose(short[1, :1], out[1, :1], atol=1e-6)
    # A different pad embedding changes nothing at the real tokens: no query attends to a pad key.
    with torch.no_grad():
        enc.token_embedding.weight[PAD_ID] += torch.randn(16)
    moved = enc(tokens)
    assert torch.allclose(moved[0, :4], out[0, :4], atol=1e-6) and torch.allclose(moved[1, :1], out[1, :1], atol=1e-6)
    assert not torch.allclose(moved[0, 4:], out[0, 4:], atol=1e-4)  # the pad positions themselves do move
    with pytest.raises(ValueError, match="token ids must be in"):
        enc(torch.full((1, 4), tok.vocab_size))
    with pytest.raises(ValueError, match="length 17; this text encoder takes 1..16"):
        enc(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible by heads"):
        TextEncoderConfig(10, 8, width=10, heads=4)


def test_class_embedder_has_a_null_row():
    emb = ClassEmbedder(3, 8)
    out = emb(torch.tensor([0, 3, 3]))
    assert out.shape == (3, 1, 8) and emb.null_class == 3 and emb.embedding.num_embeddings == 4
    assert torch.equal(out[1, 0], emb.embedding.weight[3]) and torch.equal(out[1], out[2])
    assert not torch.equal(out[0], out[1])


def test_spatial_rescaler_resizes_then_maps_channels():
    r = SpatialRescaler(3, SpatialRescalerConfig(n_stages=2, multiplier=0.5, out_channels=5))
    x = torch.randn(2, 3, 32, 24)
    assert r(x).shape == (2, 5, 8, 6) and r.out_channels == 5
    plain = SpatialRescaler(3, SpatialRescalerConfig(n_stages=1, method="area"))
    assert torch.allclose(plain(x), F.avg_pool2d(x, 2), atol=1e-6) and plain.out_channels == 3
    assert not list(plain.parameters())
    with pytest.raises(ValueError, match="method must be one of"):
        SpatialRescalerConfig(method="linear")



def test_unshuffle_rescaler_is_a_strided_convolution_that_keeps_every_pixel():
    torch.manual_seed(0)
    r = SpatialRescaler(3, SpatialRescalerConfig(n_stages=2, method="unshuffle", out_channels=5))
    x = torch.randn(2, 3, 32, 24)
    assert r(x).shape == (2, 5, 8, 6) and r.out_channels == 5 and r.channel_mapper.in_channels == 48
    # The same map as a 4x4 convolution of stride 4 whose kernel is the 1x1 conv's weight, rearranged.
    w = r.channel_mapper.weight.view(5, 3, 4, 4)  # unshuffle twice: channel c·16 + (2·y1 + x1)·4 + (2·y2 + x2)
    kernel = torch.zeros(5, 3, 4, 4)
    for y in range(4):
        for x_ in range(4):
            y1, y2, x1, x2 = y % 2, y // 2, x_ % 2, x_ // 2  # first unshuffle takes the fine offset
            kernel[:, :, y, x_] = w[:, :, 2 * y1 + x1, 2 * y2 + x2]
    assert torch.allclose(r(x), F.conv2d(x, kernel, stride=4), atol=1e-5)
    # Two maps that area pooling cannot tell apart (the same share of each class per 4x4 block) stay apart.
    a = torch.zeros(1, 3, 4, 4)
    a[0, 0, :2] = 1
    b = torch.zeros(1, 3, 4, 4)
    b[0, 0, :, :2] = 1
    assert torch.equal(F.avg_pool2d(a, 4), F.avg_pool2d(b, 4)) and not torch.allclose(r(a), r(b))
    assert SpatialRescaler(3, SpatialRescalerConfig(n_stages=1, method="unshuffle")).out_channels == 12
    with pytest.raises(ValueError, match="multiplier must be 0.5"):
        SpatialRescalerConfig(method="unshuffle", multiplier=0.25)


# ------------------------------------------------------------------------------------------------------------------
# Conditioner: modes, null condition, drop, config round trip

TEXT = {"width": 16, "depth": 1, "heads": 2}


def _conditioners() -> dict:
    tok = _tokenizer()
    return {
        "crossattn_text": build_conditioner({"mode": "crossattn", "kind": "text", "text": TEXT}, tok),
        "crossattn_class": build_conditioner({"mode": "crossattn", "kind": "class", "num_classes": 3, "class_dim": 12}),
        "adm_class": build_conditioner({"mode": "adm", "kind": "class", "num_classes": 3}),
        "adm_vector": build_conditioner({"mode": "adm", "kind": "vector", "adm_in_channels": 6}),
        "concat": build_conditioner(
            {"mode": "concat", "concat_channels": 1, "rescaler": {"n_stages": 2, "out_channels": 2}}
        ),
        "hybrid": build_conditioner({"mode": "hybrid", "kind": "text", "text": TEXT, "concat_channels": 2}, tok),
    }


def _batch(b: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt": ["a red circle", "a green square at the top left", "a blue triangle"][:b],
        "label": torch.tensor([0, 2, 1])[:b],
        "vector": torch.randn(b, 6, generator=g),
        "concat": torch.randn(b, 2, 8, 8, generator=g),
        "image": torch.zeros(b, 4, 8, 8),  # a key no conditioner reads
    }


EXPECTED = {  # mode -> (kwargs, UNetConfig fields)
    "crossattn_text": ({"context": (3, 16, 16)}, {"context_dim": 16}),
    "crossattn_class": ({"context": (3, 1, 12)}, {"context_dim": 12}),
    "adm_class": ({"y": (3,)}, {"num_classes": 3}),
    "adm_vector": ({"y": (3, 6)}, {"adm_in_channels": 6}),
    "concat": ({"concat": (3, 2, 8, 8)}, {"concat_channels": 2}),
    "hybrid": ({"context": (3, 16, 16), "concat": (3, 2, 8, 8)}, {"context_dim": 16, "concat_channels": 2}),
}


def _batch_for(name: str, b: int = 3) -> dict:
    batch = _batch(b)
    if name == "concat":  # a 1-channel condition at 4x the latent size, rescaled to 8x8 by two halvings
        batch["concat"] = torch.randn(b, 1, 32, 32)
    return batch


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_mode_gives_the_unet_kwargs_and_a_tiny_unet_runs_on_them(name):
    cond = _conditioners()[name]
    kwargs_shapes, unet_fields = EXPECTED[name]
    want = {"context_dim": None, "num_classes": None, "concat_channels": 0, "adm_in_channels": None, **unet_fields}
    assert cond.unet_kwargs() == want
    out = cond(_batch_for(name))
    assert {k: tuple(v.shape) for k, v in out.items()} == kwargs_shapes
    unet = _unet_for(cond).eval()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999])
    with torch.no_grad():
        eps = unet(x, t, **out)
        eps_null = unet(x, t, **cond(cond.null_like(_batch_for(name))))
    assert eps.shape == x.shape and torch.isfinite(eps).all() and torch.isfinite(eps_null).all()


def test_null_like_gives_the_null_condition_of_each_kind():
    conds = _conditioners()
    batch = _batch()
    null = conds["crossattn_text"].null_like(batch)
    assert null["prompt"] == ["", "", ""] and null["label"] is batch["label"] and null["image"] is batch["image"]
    ctx = conds["crossattn_text"](null)["context"]
    assert torch.equal(ctx[0], ctx[2])
    tokens = conds["crossattn_text"].tokenizer.encode(batch["prompt"])
    null_tokens = conds["crossattn_text"].null_like({"tokens": tokens})["tokens"]
    assert null_tokens.tolist() == conds["crossattn_text"].tokenizer.encode([""] * 3).tolist()
    assert conds["adm_class"].null_like(batch)["label"].tolist() == [3, 3, 3]
    assert not conds["adm_vector"].null_like(batch)["vector"].any()
    assert conds["hybrid"].null_like(batch)["concat"] is batch["concat"]  # a concat input is kept by default
    zeroing = build_conditioner({"mode": "concat", "concat_channels": 2, "drop_concat": True})
    assert not zeroing.null_like(batch)["concat"].any()


def test_drop_replaces_exactly_the_masked_rows():
    conds = _conditioners()
    batch, mask = _batch(), torch.tensor([True, False, True])
    text = conds["crossattn_text"].drop(batch, mask)
    assert text["prompt"] == ["", batch["prompt"][1], ""] and text["label"] is batch["label"]
    tok = conds["crossattn_text"].tokenizer
    tokens = tok.encode(batch["prompt"])
    dropped = conds["crossattn_text"].drop({"tokens": tokens}, mask)["tokens"]
    assert torch.equal(dropped[1], tokens[1]) and torch.equal(dropped[[0, 2]], tok.encode(["", ""]))
    assert conds["adm_class"].drop(batch, mask)["label"].tolist() == [3, 2, 3]
    vec = conds["adm_vector"].drop(batch, mask)["vector"]
    assert torch.equal(vec[1], batch["vector"][1]) and not vec[[0, 2]].any()
    hybrid = conds["hybrid"].drop(batch, mask)
    assert hybrid["concat"] is batch["concat"] and hybrid["prompt"] == ["", batch["prompt"][1], ""]
    zeroing = build_conditioner({"mode": "concat", "concat_channels": 2, "drop_concat": True})
    c = zeroing.drop(batch, mask)["concat"]
    assert torch.equal(c[1], batch["concat"][1]) and not c[[0, 2]].any()
    # The conditional rows' outputs are untouched; the dropped rows equal the null condition's.
    ctx, ctx_drop = conds["crossattn_text"](batch)["context"], conds["crossattn_text"](text)["context"]
    ctx_null = conds["crossattn_text"](conds["crossattn_text"].null_like(batch))["context"]
    assert torch.equal(ctx_drop[1], ctx[1]) and torch.equal(ctx_drop[0], ctx_null[0])
    with pytest.raises(ValueError, match=r"drop mask must be a \(3,\) bool tensor"):
        conds["adm_class"].drop(batch, torch.tensor([1, 0, 1]))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_build_conditioner_of_to_config_gives_identical_outputs(name, tmp_path):
    cond = _conditioners()[name]
    with torch.no_grad():
        for p in cond.parameters():
            p.add_(0.1 * torch.randn_like(p))  # differ from any fresh initialisation
    config = json.loads(json.dumps(cond.to_config()))  # JSON-able
    tokenizer = None
    if cond.tokenizer is not None:
        tokenizer = WordTokenizer.load(cond.tokenizer.save(tmp_path / "tokenizer.json"))
    again = build_conditioner(config, tokenizer)
    again.load_state_dict(cond.state_dict())
    assert again.to_config() == config and again.unet_kwargs() == cond.unet_kwargs()
    batch = _batch_for(name)
    a, b = cond.eval()(batch), again.eval()(batch)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_text_encoder_learns_jointly_from_the_unet_loss():
    cond = _conditioners()["crossattn_text"]
    unet = _unet_for(cond)
    params = list(unet.parameters()) + list(cond.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    before = {k: v.clone() for k, v in cond.state_dict().items()}
    batch, x = _batch(), torch.randn(3, 4, 8, 8)
    for _ in range(3):  # zero-initialised outputs: the context gets gradients from the second step on
        opt.zero_grad()
        loss = F.mse_loss(unet(x, torch.tensor([10, 20, 30]), **cond(batch)), torch.randn_like(x))
        loss.backward()
        opt.step()
    tok = cond.tokenizer
    for name, p in cond.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        if name != "text_encoder.token_embedding.weight":
            assert not torch.equal(p, before[name]), name
    used = tok.encode(batch["prompt"]).unique()
    emb, emb0 = cond.text_encoder.token_embedding.weight, before["text_encoder.token_embedding.weight"]
    assert all(not torch.equal(emb[i], emb0[i]) for i in used)
    assert torch.equal(emb[tok.ids["centre"]], emb0[tok.ids["centre"]])  # a word not in the batch: no gradient


def test_conditioner_errors_name_the_problem():
    tok = _tokenizer()
    with pytest.raises(ValueError, match="mode 'crossattn' takes kind"):
        build_conditioner({"mode": "crossattn", "kind": "vector", "adm_in_channels": 3})
    with pytest.raises(ValueError, match="mode must be one of"):
        build_conditioner({"mode": "cross"})
    with pytest.raises(ValueError, match=r"class_dim is set \(8\) but mode 'adm'"):
        build_conditioner({"mode": "adm", "kind": "class", "num_classes": 3, "class_dim": 8})
    with pytest.raises(ValueError, match="needs concat_channels > 0"):
        build_conditioner({"mode": "hybrid", "kind": "class", "num_classes": 3, "class_dim": 8})
    with pytest.raises(ValueError, match=r"unknown key 'text.widht' \(did you mean 'text.width'\?\)"):
        build_conditioner({"mode": "crossattn", "kind": "text", "text": {"widht": 8}}, tok)
    with pytest.raises(ValueError, match=r"text section lacks \['vocab_size', 'context_length'\]"):
        build_conditioner({"mode": "crossattn", "kind": "text", "text": TEXT})
    with pytest.raises(ValueError, match="needs its WordTokenizer"):
        build_conditioner({"mode": "crossattn", "kind": "text", "text": {"vocab_size": 9, "context_length": 4}})
    with pytest.raises(ValueError, match=r"does not match the text encoder config \(vocab_size=9"):
        build_conditioner({"mode": "crossattn", "kind": "text", "text": {"vocab_size": 9, "context_length": 16}}, tok)
    cond = build_conditioner({"mode": "crossattn", "kind": "text", "text": TEXT}, tok)
    with pytest.raises(ValueError, match=r"or 'tokens', got neither \(its keys: \['label'\]\)"):
        cond({"label": torch.tensor([1])})
    with pytest.raises(TypeError, match="must be a list of strings"):
        cond({"prompt": "a red circle"})
    with pytest.raises(ValueError, match=r"prompt has 18 tokens .*context length 16"):
        cond({"prompt": [CAPTIONS[2] + " and then more"]})
    hybrid = _conditioners()["hybrid"]
    with pytest.raises(ValueError, match="disagree on the batch size"):
        hybrid({"prompt": ["a", "b"], "concat": torch.zeros(3, 2, 8, 8)})
    with pytest.raises(ValueError, match=r"needs batch key 'concat'"):
        hybrid({"prompt": ["a"]})
    labels = _conditioners()["adm_class"]
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\] \(3 = the null class\), got \[0, 4\]"):
        labels({"label": torch.tensor([0, 4])})
    with pytest.raises(ValueError, match=r"\(2,\) long tensor"):
        labels({"label": torch.tensor([0.0, 1.0])})


# ------------------------------------------------------------------------------------------------------------------
# U-Net: the adm vector y


def test_unet_adm_vector_is_added_to_the_time_embedding():
    cfg = dataclasses.replace(PRESETS["tiny"], adm_in_channels=6)
    unet = UNet(cfg).eval()
    keys = {k for k in unet.state_dict() if k.startswith("label_emb.")}
    assert keys == {"label_emb.0.0.weight", "label_emb.0.0.bias", "label_emb.0.2.weight", "label_emb.0.2.bias"}
    assert UNet(PRESETS["digits"]).label_emb.weight.shape == (11, 128)  # the class path keeps its layout
    with torch.no_grad():
        for p in unet.parameters():  # zero-initialised outputs would hide the embedding
            if not p.any():
                p.normal_(std=0.1)
        x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 5])
        y = torch.randn(2, 6)
        a, b = unet(x, t, y=y), unet(x, t, y=y + 1)
        assert not torch.allclose(a, b, atol=1e-5)
        assert torch.allclose(unet(x, t, y=y.double()), a, atol=1e-5)  # cast to the weights' dtype
    with pytest.raises(ValueError, match=r"y is required: this UNet adds a \(2, 6\) vector"):
        unet(x, t)
    with pytest.raises(ValueError, match=r"y must be a \(2, 6\) float tensor"):
        unet(x, t, y=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="num_classes and adm_in_channels both set"):
        dataclasses.replace(cfg, num_classes=3)
    with pytest.raises(ValueError, match="adm_in_channels must be None or a positive integer"):
        UNetConfig(adm_in_channels=0)
