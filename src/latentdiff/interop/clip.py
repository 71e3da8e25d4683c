"""τ_θ of Stable Diffusion: a CLIP text model (transformers' ``CLIPTextModel`` and ``CLIPTokenizer``) behind
latentdiff's conditioner interface (``batch -> {"context": ...}``, ``null_like``, ``input_keys``).

The context is the text model's last hidden state after its final layer norm (SD 1.x), or with ``layer =
"penultimate"`` the hidden state one block earlier, through the same final norm (CompVis' SD 2.x OpenCLIP encoder).
diffusers folders of SD 2.x store the OpenCLIP encoder already cut to its first 23 blocks, so they use "last".
Prompts are tokenised as diffusers' pipelines do: padded to the tokenizer's model_max_length, truncated beyond it.
The null condition is the empty prompt.

Single files hold the text model in one of two layouts: transformers' own (``cond_stage_model.transformer.``, SD 1.x)
or OpenCLIP's (``cond_stage_model.model.``, SD 2.x), which :func:`openclip_to_transformers` renames.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, MissingFileError
from ..fileio import atomic_write, atomic_write_text, read_json

LAYERS = ("last", "penultimate")


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


class ClipTokens:
    """The tokenizer as ``Pipeline`` asks for it: ``encode(prompts) -> (B, L) long ids``, padded and truncated to L
    = model_max_length (77 for Stable Diffusion). ``files``: the text files it was read from, written back verbatim
    by :meth:`save` (so every transformers version reads the copy, and round trips are byte-identical)."""

    def __init__(self, tokenizer, files: dict[str, str]):
        self.tokenizer = tokenizer
        self.files = dict(files)
        self.context_length = int(tokenizer.model_max_length)

    def save(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in self.files.items():
            atomic_write_text(folder / name, text)

    def encode(self, prompts) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.context_length, truncation=True,
                             return_tensors="pt").input_ids
        return ids.long()


class ClipConditioner(nn.Module):
    """``forward({"prompt": [...]}) -> {"context": (B, 77, width)}`` from a CLIP text model (Rombach et al. 2022,
    sec. 3.3: τ_θ(y) for the U-Net's cross-attention)."""

    kind = "text"  # what Pipeline.sample takes: prompts
    mode = "crossattn"
    input_keys = ("prompt",)

    def __init__(self, text_model, tokenizer: ClipTokens, layer: str = "last"):
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"CLIP layer must be one of {LAYERS}, got {layer!r}")
        self.text_model = text_model
        self.tokenizer = tokenizer
        self.layer = layer
        self.prefixed = getattr(text_model, "file_prefixed", True)  # its file named tensors text_model.*

    @property
    def width(self) -> int:
        return int(self.text_model.config.hidden_size)

    def unet_kwargs(self) -> dict:
        return {"context_dim": self.width}

    def forward(self, batch: dict) -> dict:
        ids = self.tokenizer.encode(batch["prompt"]).to(next(self.text_model.parameters()).device)
        if self.layer == "last":
            return {"context": self.text_model(ids).last_hidden_state}
        hidden = self.text_model(ids, output_hidden_states=True).hidden_states[-2]
        inner = getattr(self.text_model, "text_model", self.text_model)  # transformers < 5 nests it
        return {"context": inner.final_layer_norm(hidden)}

    def file_state(self) -> dict:
        """The text model's tensors under the file layout's names (``text_model.`` first, as SD files and older
        transformers versions write them; transformers 5 drops the prefix in the module)."""
        return {file_key(k): v for k, v in self.text_model.state_dict().items() if file_key(k) not in IGNORED}

    def null_like(self, batch: dict) -> dict:
        return {**batch, "prompt": [""] * len(batch["prompt"])}

    def save_folders(self, folder) -> None:
        """Write ``text_encoder/`` and ``tokenizer/`` (transformers' own files) into a model folder."""
        folder = Path(folder)
        from safetensors.torch import save_file

        out = folder / "text_encoder"
        out.mkdir(parents=True, exist_ok=True)
        state = self.file_state()
        if not self.prefixed:  # keep the naming of the folder it came from (transformers 5 writes no prefix)
            state = {k[len("text_model."):]: v for k, v in state.items()}
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        atomic_write_text(out / "config.json", self.text_model.config.to_json_string())
        atomic_write_text(out / "latentdiff.json", json.dumps({"layer": self.layer}))
        self.tokenizer.save(folder / "tokenizer")

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, width={self.width}"


def load_tokenizer(folder) -> ClipTokens:
    """A CLIPTokenizer from a local folder of vocab.json and merges.txt (never a download)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise MissingFileError(f"{folder}: no {name} (a CLIP tokenizer folder holds vocab.json and merges.txt)")
    files = {name: (folder / name).read_text() for name in TOKENIZER_FILES if (folder / name).is_file()}
    try:
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, Exception) as e:  # the tokenizers backend raises its own Exception type
        raise CheckpointError(f"{folder}: unreadable CLIP tokenizer ({str(e)[:200]})") from None
    return ClipTokens(tok, files)


def load_text_model(folder):
    """A CLIPTextModel from a local folder (config.json + model.safetensors, as ``save_pretrained`` writes it),
    built on the meta device with the file's tensors assigned (a pickled .bin is refused)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise MissingFileError(f"{folder}: no config.json for the CLIP text model")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        bins = sorted(p.name for p in folder.glob("*.bin"))
        raise (CheckpointError(f"{folder}: weights only as a pickled {bins[0]}, which latentdiff never unpickles; "
                               "convert them to .safetensors first") if bins
               else MissingFileError(f"{folder}: no model.safetensors"))
    try:
        config = CLIPTextConfig.from_json_file(str(folder / "config.json"))
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: unreadable CLIP text model ({e})") from None
    model = text_model_from_state(state, config, str(weights))
    model.file_prefixed = all(k.startswith("text_model.") for k in state)
    return model


def load_conditioner(folder) -> ClipConditioner:
    """The CLIP conditioner of a diffusers or latentdiff folder: its ``text_encoder/`` and ``tokenizer/``."""
    folder = Path(folder)
    layer = "last"
    extra = folder / "text_encoder" / "latentdiff.json"
    if extra.is_file():
        layer = read_json(extra, CheckpointError).get("layer", "last")
    return ClipConditioner(load_text_model(folder / "text_encoder"), load_tokenizer(folder / "tokenizer"), layer)


# ------------------------------------------------------------------------------------------------------------------
# Single-file layouts

HF_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
IGNORED = ("text_model.embeddings.position_ids",)  # a buffer, recomputed (file-layout name)


def text_config_from_state(state: dict, act: str):
    """A CLIPTextConfig that fits transformers-layout weights ``state`` (``text_model.*``): widths, depth,
    vocabulary and context length read from the shapes; heads = width / 64 (OpenAI's and OpenCLIP's CLIP)."""
    from transformers import CLIPTextConfig

    tok = state["text_model.embeddings.token_embedding.weight"]
    pos = state["text_model.embeddings.position_embedding.weight"]
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers."))
    width = tok.shape[1]
    return CLIPTextConfig(vocab_size=tok.shape[0], hidden_size=width, num_hidden_layers=depth,
                          num_attention_heads=max(1, width // 64),
                          intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                          max_position_embeddings=pos.shape[0], hidden_act=act, projection_dim=width)


def openclip_to_transformers(state: dict, drop_last: bool = True) -> dict:
    """OpenCLIP text-tower keys (without prefix) -> transformers CLIPTextModel keys; the fused in_proj splits into
    q, k, v. ``drop_last``: leave out the last block (SD 2.x conditions on the penultimate one)."""
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")})
    keep = blocks[:-1] if drop_last else blocks
    out = {"text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
           "text_model.final_layer_norm.weight": state["ln_final.weight"],
           "text_model.final_layer_norm.bias": state["ln_final.bias"]}
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in keep:
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for a, b in names.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{b}.{leaf}"] = state[f"{src}{a}.{leaf}"]
        for leaf in ("weight", "bias"):
            q, k, v = state[f"{src}attn.in_proj_{leaf}"].chunk(3, dim=0)
            for name, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{dst}self_attn.{name}.{leaf}"] = t
    return out


def file_key(key: str) -> str:
    """A CLIPTextModel state-dict key in the file layout (``text_model.`` prefix)."""
    return key if key.startswith("text_model.") else "text_model." + key


def text_model_from_state(state: dict, config, where: str):
    """A CLIPTextModel with ``config`` holding ``state`` (transformers layout, with or without the ``text_model.``
    prefix); unexpected and missing keys are named."""
    from transformers import CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(config)
    own = {file_key(k): k for k in model.state_dict()}
    state = {own.get(file_key(k), k): v for k, v in state.items() if file_key(k) not in IGNORED}
    expected = {k for k in model.state_dict() if file_key(k) not in IGNORED}
    given = set(state)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise CheckpointError(f"{where}: text encoder keys do not match a CLIP text model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=True)
    for name, buf in list(model.named_buffers()):  # position_ids: recomputed, not read
        if buf.is_meta:
            parent, leaf = name.rsplit(".", 1)
            model.get_submodule(parent).register_buffer(
                leaf, torch.arange(config.max_position_embeddings).unsqueeze(0), persistent=False)
    return model.float().eval()
