"""Conditioners: a batch of conditions in, the U-Net's conditioning arguments out (Rombach et al. 2022, sec. 3.3).

One interface for every conditioning mode of LDM's ``DiffusionWrapper``:

    tokenizer = WordTokenizer.build(train_captions, context_length=16)
    cond = build_conditioner({"mode": "crossattn", "kind": "text", "text": {"width": 64}}, tokenizer=tokenizer)
    unet = UNet(dataclasses.replace(unet_config, **cond.unet_kwargs()))
    kwargs = cond({"prompt": ["a red circle at the top left", ""]})  # {"context": (2, 16, 64)}
    eps = unet(z_t, t, **kwargs)                                      # ε_θ(z_t, t, τ_θ(y))
    batch = cond.drop(batch, torch.rand(B) < cond_drop_prob)          # training: some rows become the null condition
    kwargs_uncond = cond(cond.null_like(batch))                       # guidance: the unconditional branch
    config = cond.to_config()                                         # JSON; the tokenizer is saved on its own
    same = build_conditioner(config, tokenizer=WordTokenizer.load(...))  # same architecture (load the weights after)

A batch of conditions is a dict; a conditioner reads only its own keys and ignores the others (an image batch may
carry a caption and a label; a text conditioner reads the caption):
    "prompt": list[str] or "tokens": (B, L) long    text (give one of the two)
    "label": (B,) long in [0, num_classes]           class; num_classes is the null class
    "layout": (B, K, 5) float                        objects [class, x0, y0, x1, y1]; class -1 = empty slot
    "vector": (B, adm_in_channels) float             a vector condition (adm mode)
    "concat": (B, C, H, W) float                     a spatially aligned condition (mask, low-res image, ...)

| mode      | kind   | reads              | U-Net kwargs out                              | sets in UNetConfig  |
| --------- | ------ | ------------------ | --------------------------------------------- | ------------------- |
| crossattn | text   | prompt or tokens   | context = τ_θ(tokens): (B, L, text.width)     | context_dim         |
| crossattn | class  | label              | context = ClassEmbedder(label): (B, 1, dim)   | context_dim         |
| crossattn | layout | layout             | context = LayoutEncoder(layout): (B, 3K, dim) | context_dim         |
| adm       | class  | label              | y = label (B,) long; the U-Net's label_emb    | num_classes         |
|           |        |                    | embeds it (ADM's class conditioning)          |                     |
| adm       | vector | vector             | y (B, adm_in_channels) float, added to the    | adm_in_channels     |
|           |        |                    | time embedding through Linear-SiLU-Linear     |                     |
| concat    | None   | concat             | concat, as given or through SpatialRescaler   | concat_channels     |
| hybrid    | text,  | the above, and     | context and concat                            | context_dim,        |
|           | class, | concat             |                                               | concat_channels     |
|           | layout |                    |                                               |                     |

The null condition (``null_like``; ``drop`` puts it in the masked rows): the empty prompt "" (tokens [<end>,
<pad>, ...]), the null class ``num_classes``, the empty layout (every slot's class -1), a zero vector. A concat
input is NOT dropped by default: it stays as given in the null batch, as in LDM's super-resolution and inpainting
models, where guidance acts on the text alone and the unconditional branch still sees the low-resolution image or
the mask. With ``drop_concat=True`` it is zeros.

The text encoder τ_θ is trained jointly with the U-Net (LDM sec. 4.3.1): put ``conditioner.parameters()`` in the
optimizer with the U-Net's. The class embedder and the rescaler learn the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..dataclass_io import from_dict as build_dataclass
from .layout_encoder import LayoutEncoder, LayoutEncoderConfig
from .text_encoder import TextEncoder, TextEncoderConfig
from .tokenizer import WordTokenizer

MODES = ("crossattn", "concat", "hybrid", "adm")
KINDS = {"crossattn": ("text", "class", "layout"), "hybrid": ("text", "class", "layout"), "adm": ("class", "vector"),
         "concat": (None,)}
RESIZE_METHODS = ("nearest", "bilinear", "bicubic", "area", "unshuffle")


class ClassEmbedder(nn.Module):
    """LDM's ClassEmbedder: forward(label (B,) long in [0, num_classes]) -> (B, 1, dim), one context token.

    ``num_classes + 1`` rows; the last (id ``num_classes``) is the null class of classifier-free guidance.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        return self.embedding(label)[:, None, :]  # (B, 1, dim)


@dataclass
class SpatialRescalerConfig:
    n_stages: int = 1  # resizes by `multiplier`, one after the other (0 = no resize: the 1x1 conv alone)
    multiplier: float = 0.5  # size factor of each stage: 0.5 takes an image to an f=2 latent size per stage
    method: str = "bilinear"  # F.interpolate mode: nearest, bilinear, bicubic or area; or "unshuffle": each stage
    #                           moves 2x2 pixels into channels (space-to-depth, multiplier 0.5), so the 1x1 conv
    #                           after it is a learned strided convolution that keeps every pixel of a sharp map
    out_channels: int | None = None  # 1x1 conv to this many channels after the resize; None = no conv, channels kept
    bias: bool = False  # bias of that 1x1 conv (LDM's default: none)

    def __post_init__(self):
        if not isinstance(self.n_stages, int) or isinstance(self.n_stages, bool) or self.n_stages < 0:
            raise ValueError(f"SpatialRescalerConfig.n_stages must be an integer >= 0, got {self.n_stages!r}")
        if not isinstance(self.multiplier, (int, float)) or self.multiplier <= 0:
            raise ValueError(f"SpatialRescalerConfig.multiplier must be a positive number, got {self.multiplier!r}")
        if self.method not in RESIZE_METHODS:
            raise ValueError(f"SpatialRescalerConfig.method must be one of {RESIZE_METHODS}, got {self.method!r}")
        if self.method == "unshuffle" and self.multiplier != 0.5:
            raise ValueError(f"SpatialRescalerConfig: method 'unshuffle' halves the size at each stage; multiplier "
                             f"must be 0.5, got {self.multiplier!r}")
        if self.out_channels is not None and (not isinstance(self.out_channels, int) or self.out_channels <= 0):
            raise ValueError(f"SpatialRescalerConfig.out_channels must be None or positive, got {self.out_channels!r}")


class SpatialRescaler(nn.Module):
    """LDM's SpatialRescaler: resize ``n_stages`` times by ``multiplier``, then an optional learned 1x1 conv.

    forward((B, in_channels, H, W)) -> (B, out_channels, H·m^n, W·m^n). Takes a pixel-space condition (a mask,
    a low-resolution or masked image) to the latent grid before it is concatenated to z_t. With method
    ``unshuffle`` the resize is space-to-depth (``in_channels·4^n`` channels before the conv): nothing of the map is
    averaged away, and the 1x1 conv that follows is a learned 2^n-strided convolution of kernel 2^n.
    """

    def __init__(self, in_channels: int, config: SpatialRescalerConfig | None = None):
        super().__init__()
        self.config = cfg = config or SpatialRescalerConfig()
        self.in_channels = in_channels
        resized = in_channels * 4 ** cfg.n_stages if cfg.method == "unshuffle" else in_channels
        self.out_channels = cfg.out_channels or resized
        self.channel_mapper = None
        if cfg.out_channels is not None:
            self.channel_mapper = nn.Conv2d(resized, cfg.out_channels, 1, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        corners = {"align_corners": False} if cfg.method in ("bilinear", "bicubic") else {}
        for _ in range(cfg.n_stages):
            if cfg.method == "unshuffle":
                x = F.pixel_unshuffle(x, 2)
            else:
                x = F.interpolate(x, scale_factor=cfg.multiplier, mode=cfg.method, **corners)
        return x if self.channel_mapper is None else self.channel_mapper(x)


@dataclass
class ConditionerConfig:
    mode: str  # LDM's conditioning_key: crossattn, concat, hybrid (crossattn + concat) or adm (vector y)
    kind: str | None = None  # what feeds context (crossattn, hybrid) or y (adm): text, class, layout, vector; None
    #                          for concat
    text: TextEncoderConfig | None = None  # kind text: τ_θ (vocab_size and context_length match the tokenizer)
    layout: LayoutEncoderConfig | None = None  # kind layout: the box-token transformer (nn/layout_encoder.py)
    num_classes: int | None = None  # kind class: labels 0..num_classes-1; num_classes itself is the null class
    class_dim: int | None = None  # kind class in crossattn/hybrid: width of the one context token (adm: unused)
    adm_in_channels: int | None = None  # kind vector: width of the vector y
    concat_channels: int = 0  # concat, hybrid: channels of batch["concat"] as given (before the rescaler)
    rescaler: SpatialRescalerConfig | None = None  # concat, hybrid: resize / 1x1 conv of the concat input; None = as is
    drop_concat: bool = False  # null_like / drop zero the concat input too (default: kept, as LDM's SR / inpainting)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"ConditionerConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.kind not in KINDS[self.mode]:
            raise ValueError(f"ConditionerConfig: mode {self.mode!r} takes kind {KINDS[self.mode]}, got {self.kind!r}")
        if isinstance(self.text, dict):
            self.text = TextEncoderConfig.from_dict(self.text)
        if isinstance(self.layout, dict):
            self.layout = LayoutEncoderConfig.from_dict(self.layout)
        if isinstance(self.rescaler, dict):
            self.rescaler = build_dataclass(SpatialRescalerConfig, self.rescaler, "SpatialRescalerConfig")
        wanted = {
            "text": self.kind == "text",
            "layout": self.kind == "layout",
            "num_classes": self.kind == "class",
            "class_dim": self.kind == "class" and self.mode != "adm",
            "adm_in_channels": self.kind == "vector",
        }
        for name, needed in wanted.items():
            value = getattr(self, name)
            if needed and value is None:
                raise ValueError(f"ConditionerConfig: mode {self.mode!r} with kind {self.kind!r} needs {name}")
            if not needed and value is not None:
                raise ValueError(
                    f"ConditionerConfig.{name} is set ({value!r}) but mode {self.mode!r} with kind {self.kind!r} "
                    "does not use it; remove it"
                )
            structured = name in ("text", "layout")
            if needed and not structured and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"ConditionerConfig.{name} must be a positive integer, got {value!r}")
        spatial = self.mode in ("concat", "hybrid")
        if not isinstance(self.concat_channels, int) or self.concat_channels < 0:
            raise ValueError(f"ConditionerConfig.concat_channels must be an integer >= 0, got {self.concat_channels!r}")
        if spatial and self.concat_channels == 0:
            raise ValueError(f"ConditionerConfig: mode {self.mode!r} needs concat_channels > 0 (channels of 'concat')")
        if not spatial and (self.concat_channels or self.rescaler is not None or self.drop_concat):
            raise ValueError(
                f"ConditionerConfig: concat_channels, rescaler and drop_concat are for modes concat and hybrid, "
                f"not {self.mode!r}"
            )

    @classmethod
    def from_dict(cls, d: dict, tokenizer: WordTokenizer | None = None) -> "ConditionerConfig":
        """From a plain dict (YAML / JSON; unknown keys are errors). A ``text`` section without vocab_size or
        context_length takes them from ``tokenizer`` (a recipe names neither: they come from its captions)."""
        if not isinstance(d, dict):
            raise ValueError(f"a conditioner config must be a mapping, got {type(d).__name__}")
        d = dict(d)
        if isinstance(d.get("text"), dict):
            if tokenizer is not None:
                sizes = {"vocab_size": tokenizer.vocab_size, "context_length": tokenizer.context_length}
                d["text"] = {**sizes, **d["text"]}
            missing = [k for k in ("vocab_size", "context_length") if k not in d["text"]]
            if missing:
                raise ValueError(f"the conditioner's text section lacks {missing}: give them or pass the tokenizer")
        return build_dataclass(cls, d, "ConditionerConfig")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Conditioner(nn.Module):
    """A batch of conditions -> the U-Net's ``context`` / ``y`` / ``concat``; see the module docstring.

    Submodules (state-dict prefixes): ``text_encoder`` (kind text), ``layout_encoder`` (kind layout),
    ``class_embedder`` (kind class in crossattn /
    hybrid), ``rescaler`` (when configured). ``tokenizer`` is a plain attribute (not weights): save it with
    ``conditioner.tokenizer.save(folder / "tokenizer.json")``.
    """

    def __init__(self, config: ConditionerConfig, tokenizer: WordTokenizer | None = None):
        super().__init__()
        if not isinstance(config, ConditionerConfig):
            raise TypeError(f"Conditioner expects a ConditionerConfig, got {type(config).__name__}")
        self.config = cfg = config
        if cfg.kind == "text":
            if not isinstance(tokenizer, WordTokenizer):
                raise ValueError("a text conditioner needs its WordTokenizer (tokenizer=...)")
            mine = (cfg.text.vocab_size, cfg.text.context_length)
            if (tokenizer.vocab_size, tokenizer.context_length) != mine:
                raise ValueError(
                    f"tokenizer (vocab_size={tokenizer.vocab_size}, context_length={tokenizer.context_length}) does "
                    f"not match the text encoder config (vocab_size={mine[0]}, context_length={mine[1]})"
                )
        elif tokenizer is not None:
            raise ValueError(f"a tokenizer was given, but this conditioner's kind is {cfg.kind!r}, not 'text'")
        self.tokenizer = tokenizer
        self.text_encoder = TextEncoder(cfg.text) if cfg.kind == "text" else None
        self.layout_encoder = LayoutEncoder(cfg.layout) if cfg.kind == "layout" else None
        self.class_embedder = ClassEmbedder(cfg.num_classes, cfg.class_dim) if cfg.class_dim is not None else None
        self.rescaler = SpatialRescaler(cfg.concat_channels, cfg.rescaler) if cfg.rescaler is not None else None

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def kind(self) -> str | None:
        return self.config.kind

    @property
    def input_keys(self) -> tuple[str, ...]:
        """Batch keys this conditioner reads ("prompt" stands for "prompt" or "tokens")."""
        keys = {"text": ("prompt",), "class": ("label",), "layout": ("layout",), "vector": ("vector",), None: ()}[
            self.kind]
        return keys + (("concat",) if self.config.concat_channels else ())

    def unet_kwargs(self) -> dict:
        """UNetConfig fields that must match this conditioner: context_dim, num_classes, concat_channels,
        adm_in_channels (all four, None / 0 when unused), for ``dataclasses.replace(unet_config, **these)``."""
        cfg = self.config
        context_dim = {"text": cfg.text.width if cfg.text else None,
                       "layout": cfg.layout.width if cfg.layout else None}.get(cfg.kind, cfg.class_dim)
        concat = self.rescaler.out_channels if self.rescaler is not None else cfg.concat_channels
        return {
            "context_dim": context_dim,
            "num_classes": cfg.num_classes if self.mode == "adm" else None,
            "concat_channels": concat,
            "adm_in_channels": cfg.adm_in_channels,
        }

    def to_config(self) -> dict:
        """JSON-able config; ``build_conditioner(to_config(), tokenizer)`` rebuilds the same architecture."""
        return self.config.to_dict()

    # ---- the batch of conditions -------------------------------------------------------------------------------

    def batch_size(self, batch: dict) -> int:
        """B of the condition entries this conditioner reads; errors name a missing key or disagreeing sizes."""
        if not isinstance(batch, dict):
            raise TypeError(f"a batch of conditions is a dict, got {type(batch).__name__}")
        sizes = {}
        for key in self.input_keys:
            if key == "prompt":
                given = [k for k in ("prompt", "tokens") if k in batch]
                if len(given) != 1:
                    what = "both 'prompt' and 'tokens'" if given else f"neither (its keys: {sorted(batch)})"
                    raise ValueError(f"a text condition needs batch key 'prompt' (list[str]) or 'tokens', got {what}")
                key = given[0]
                if key == "prompt" and (isinstance(batch[key], str) or not isinstance(batch[key], (list, tuple))):
                    raise TypeError(f"batch['prompt'] must be a list of strings, got {type(batch[key]).__name__}")
            elif key not in batch:
                raise ValueError(
                    f"this conditioner (mode {self.mode!r}, kind {self.kind!r}) needs batch key {key!r}; "
                    f"the batch has {sorted(batch)}"
                )
            sizes[key] = len(batch[key])
        if len(set(sizes.values())) > 1:
            raise ValueError(f"condition entries disagree on the batch size: {sizes}")
        if not sizes:
            raise ValueError("this conditioner reads no batch keys")  # unreachable with a valid config
        return next(iter(sizes.values()))

    def forward(self, batch: dict) -> dict:
        """U-Net keyword arguments: a subset of {"context", "y", "concat"} as in the module docstring's table."""
        cfg, out = self.config, {}
        b = self.batch_size(batch)
        if cfg.kind == "text":
            if "prompt" in batch:
                tokens = self.tokenizer.encode(list(batch["prompt"]))
                tokens = tokens.to(self.text_encoder.token_embedding.weight.device)
            else:
                tokens = batch["tokens"]
            out["context"] = self.text_encoder(tokens)  # τ_θ(y): (B, L, width)
        elif cfg.kind == "class":
            label = self._check_label(batch["label"], b)
            if self.mode == "adm":
                out["y"] = label  # embedded by the U-Net's label_emb (num_classes)
            else:
                out["context"] = self.class_embedder(label)  # (B, 1, class_dim)
        elif cfg.kind == "layout":
            out["context"] = self.layout_encoder(batch["layout"])  # (B, 3K, width)
        elif cfg.kind == "vector":
            vector = batch["vector"]
            want = (b, cfg.adm_in_channels)
            if not isinstance(vector, torch.Tensor) or tuple(vector.shape) != want or not vector.is_floating_point():
                got = f"{tuple(vector.shape)} {vector.dtype}" if isinstance(vector, torch.Tensor) else type(vector)
                raise ValueError(f"batch['vector'] must be a float tensor of shape {want}, got {got}")
            out["y"] = vector
        if cfg.concat_channels:
            c = batch["concat"]
            if not isinstance(c, torch.Tensor) or c.dim() != 4 or c.shape[1] != cfg.concat_channels:
                got = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
                raise ValueError(f"batch['concat'] must be ({b}, {cfg.concat_channels}, H, W), got {got}")
            out["concat"] = c if self.rescaler is None else self.rescaler(c)
        return out

    def _check_label(self, label, b: int) -> torch.Tensor:
        n = self.config.num_classes
        if not isinstance(label, torch.Tensor) or label.shape != (b,) or label.dtype not in (torch.int64, torch.int32):
            got = f"{tuple(label.shape)} {label.dtype}" if isinstance(label, torch.Tensor) else type(label).__name__
            raise ValueError(f"batch['label'] must be a ({b},) long tensor of class ids, got {got}")
        # Range check on CPU only: on an accelerator it would force a device sync every call.
        if label.device.type == "cpu" and label.numel() and (int(label.min()) < 0 or int(label.max()) > n):
            got = f"[{int(label.min())}, {int(label.max())}]"
            raise ValueError(f"batch['label'] must hold class ids in [0, {n}] ({n} = the null class), got {got}")
        return label

    def null_like(self, batch: dict) -> dict:
        """The batch with each condition this conditioner reads replaced by its null (see the module docstring);
        other keys are kept. Classifier-free guidance runs the U-Net on ``self(self.null_like(batch))``."""
        b, null = self.batch_size(batch), dict(batch)
        if "prompt" in self.input_keys:
            if "prompt" in batch:
                null["prompt"] = [""] * b
            else:
                empty = self.tokenizer.encode([""]).to(batch["tokens"].device)
                null["tokens"] = empty[:, : batch["tokens"].shape[1]].expand(b, -1).clone()
        if "label" in self.input_keys:
            null["label"] = torch.full_like(batch["label"], self.config.num_classes)
        if "layout" in self.input_keys:
            null["layout"] = torch.full_like(batch["layout"], -1.0)  # every slot empty
        if "vector" in self.input_keys:
            null["vector"] = torch.zeros_like(batch["vector"])
        if self.config.drop_concat:
            null["concat"] = torch.zeros_like(batch["concat"])
        return null

    def drop(self, batch: dict, mask: torch.Tensor) -> dict:
        """The batch with the rows where ``mask`` (B,) bool is True replaced by the null condition (training with
        ``cond_drop_prob``, Ho & Salimans 2022). The concat input is kept unless ``drop_concat``."""
        b, null = self.batch_size(batch), self.null_like(batch)
        if not isinstance(mask, torch.Tensor) or mask.shape != (b,) or mask.dtype != torch.bool:
            got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"drop mask must be a ({b},) bool tensor, got {got}")
        out = dict(batch)
        for key in ("prompt", "tokens", "label", "layout", "vector", "concat"):
            if key not in batch or null[key] is batch[key]:
                continue  # not a condition of this conditioner, or one that is never dropped
            if key == "prompt":
                out[key] = [n if m else p for p, n, m in zip(batch[key], null[key], mask.tolist())]
            else:
                m = mask.to(batch[key].device).view(b, *([1] * (batch[key].dim() - 1)))
                out[key] = torch.where(m, null[key], batch[key])
        return out

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, kind={self.kind!r}"


def build_conditioner(config: dict | ConditionerConfig, tokenizer: WordTokenizer | None = None) -> Conditioner:
    """The conditioner of ``config`` (a ``to_config()`` dict, a recipe's section, or a ConditionerConfig), freshly
    initialised; a text conditioner needs its ``tokenizer``. Load weights with ``load_state_dict`` afterwards."""
    if not isinstance(config, ConditionerConfig):
        config = ConditionerConfig.from_dict(config, tokenizer)
    return Conditioner(config, tokenizer)
