"""
The CLIP ViT vision encoder and CLIP image preprocessing, in plain PyTorch + pillow + numpy.

LLaVA sees an image through OpenAI's CLIP ViT-L/14 (224 px for LLaVA v1, 336 px for v1.5): that
tower, written in the style of OpenAI's CLIP model.py, and the preprocessing CLIP was trained with,
bit for bit transformers' CLIPImageProcessor. Module names are the keys of HF's `CLIPVisionModel`
(`pre_layrnorm`, sic); weights.LAYOUT maps the files' prefixes. `forward(x, layer)` takes an index
of HF's hidden states (LLaVA's `vision_feature_layer`; 0: the embeddings after `pre_layrnorm`,
i: block i's output, -2: the penultimate) and runs no block after it.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import weights

# -----------------------------------------------------------------------------
# config


@dataclass
class CLIPVisionConfig:
    # defaults: OpenAI CLIP ViT-L/14 at 224 px, the tower LLaVA v1 uses (v1.5: image_size=336)
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    num_channels: int = 3
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d):
        """From an HF vision_config or a whole CLIPConfig dict; a missing field is transformers' (ViT-B/32's)."""
        d = (d["vision_config"] or {}) if "vision_config" in d else d
        b32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32)
        cfg = cls(**{f.name: d.get(f.name, b32.get(f.name, f.default)) for f in fields(cls)})
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP vision config: hidden_act {cfg.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"CLIP vision config: hidden_size {cfg.hidden_size} is not divisible by "
                             f"num_attention_heads {cfg.num_attention_heads}")
        return cfg

    def to_hf(self):  # the vision_config dict transformers' CLIPVisionConfig reads
        return dict(asdict(self), model_type="clip_vision_model")


# -----------------------------------------------------------------------------
# model

# quick_gelu: CLIP's approximation of the GELU, which the OpenAI weights were trained with
ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}


class Embeddings(nn.Module):
    """Patchify with a strided conv, prepend the CLS token, add learned absolute positions."""

    def __init__(self, config):
        super().__init__()
        D = config.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(D))
        self.patch_embedding = nn.Conv2d(config.num_channels, D, config.patch_size, config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, D)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values)                 # [B, D, H/p, W/p]
        x = x.flatten(2).transpose(1, 2)                       # [B, P, D], patches in raster order
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)  # [B, 1+P, D], CLS first
        return x + self.position_embedding.weight              # positions 0..P broadcast over B


class Attention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections; no mask (every patch sees all)."""

    def __init__(self, config):
        super().__init__()
        D, self.n_head = config.hidden_size, config.num_attention_heads
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # [B,T,D] -> [B,H,T,hd]
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)            # scale 1/sqrt(hd), as CLIP
        y = y.transpose(1, 2).reshape(B, T, D)                 # [B, H, T, hd] -> [B, T, D]
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVision(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or CLIPVisionConfig()
        self.embeddings = Embeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = nn.Module()  # only a container, so that the keys read `encoder.layers.N.*`
        self.encoder.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def num_blocks_for(self, layer):
        """How many blocks must run to produce HF `hidden_states[layer]` (0 = embeddings only)."""
        L = self.config.num_hidden_layers
        n = layer + L + 1 if layer < 0 else layer
        if not 0 <= n <= L:
            raise ValueError(f"CLIP layer {layer} is out of range: this tower has hidden states {-(L + 1)}..{L}")
        return n

    def forward(self, pixel_values, layer=-1):
        """pixel_values [B, C, S, S] -> HF hidden_states[layer], [B, 1+P, D] with CLS first."""
        c = self.config
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"CLIP expects pixel_values [B, {c.num_channels}, {c.image_size}, {c.image_size}], "
                             f"got {list(pixel_values.shape)}")
        x = pixel_values.to(self.embeddings.patch_embedding.weight.dtype)
        x = self.pre_layrnorm(self.embeddings(x))              # hidden_states[0]
        for block in self.encoder.layers[:self.num_blocks_for(layer)]:
            x = block(x)
        return x

    def pooled(self, pixel_values):
        """CLIP's pooled output (HF pooler_output): post_layernorm of the last layer's CLS token."""
        return self.post_layernorm(self(pixel_values, layer=-1)[:, 0])

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """A directory of config.json (CLIPModel or CLIPVisionModel) + safetensors, or a Hub name."""
        path = weights.fetch(path, files=["config.json"])
        with torch.device("meta"):
            model = cls(weights.read_json(path / "config.json", "CLIP config", CLIPVisionConfig.from_hf))
        model = weights.assign_weights(model, weights.read_weights(path), path, dtype, device, part="vision_tower.")
        return model.eval()


# -----------------------------------------------------------------------------
# images

MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's per-channel pixel statistics
STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(x * 255) for x in MEAN)  # (122, 116, 104): LLaVA-1.5 expand2square background

# transformers rescales in float64, casts to float32 and normalizes in float32. A uint8 channel has
# 256 values: that arithmetic run once on each makes normalizing one lookup per pixel. [3, 256]
_LUT = ((np.arange(256) * (1 / 255)).astype(np.float32) - np.float32(MEAN)[:, None]) / np.float32(STD)[:, None]


class ImageError(ValueError):
    """A missing, unreadable or corrupt image file (the message names it)."""


def load_image(path):
    """Open an image file and decode it fully now, so corrupt data fails here, naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # open() reads only the header; truncated/corrupt pixel data shows up here
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    return img


def _rgb(img):
    # As transformers' convert_to_rgb: transparency goes onto white, not whatever hides under alpha 0
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        return Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _resize_and_crop(img, size):
    """Resize the short side to `size` with PIL bicubic (long side int(size * long / short)), centre
    crop at offset (extent - size) // 2 -> uint8 array [size, size, 3]. Pillow resizes in two
    passes, row by row and then column by column, rounding to uint8 in between: so as two calls it
    is the same computation, and a wide picture's columns that the crop drops skip the second."""
    w, h = img.size
    if w <= h:
        nh = int(size * h / w)
        return np.asarray(img.resize((size, nh), Image.BICUBIC))[(nh - size) // 2:][:size]
    left = (int(size * w / h) - size) // 2
    img = img.resize((int(size * w / h), h), Image.BICUBIC).crop((left, 0, left + size, h))
    return np.asarray(img.resize((size, size), Image.BICUBIC))


def _pad_and_resize(img, size):
    """_resize_and_crop of LLaVA-1.5's expand2square, the RGB picture centred on a square of the mean
    colour. The square of a wide (or square) one is never built: a row of one colour stays that colour
    in Pillow's row pass, so only the picture's rows take it, and the padding joins for the second."""
    w, h = img.size
    if w < h:
        square = Image.new("RGB", (h, h), PAD_COLOR)
        square.paste(img, ((h - w) // 2, 0))
        return _resize_and_crop(square, size)
    rows = Image.new("RGB", (size, w), PAD_COLOR)  # the square's w rows after the horizontal pass
    rows.paste(img.resize((size, h), Image.BICUBIC), (0, (w - h) // 2))  # centred, as expand2square
    return np.asarray(rows.resize((size, size), Image.BICUBIC))


def preprocess(pil_image, size, pad_to_square=False, out=None):
    """PIL image -> float32 tensor [3, size, size] (into `out` if given), bit-exact with
    transformers' CLIPImageProcessor(size={"shortest_edge": size}, crop_size=size) and, with
    pad_to_square, LLaVA-1.5's "pad" (LlavaImageProcessor(do_pad=True)): RGB (alpha onto white)
    -> [pad to a square of the mean colour] -> resize, centre crop -> /255, CLIP's mean and std."""
    img = _rgb(pil_image)
    a = _pad_and_resize(img, size) if pad_to_square else _resize_and_crop(img, size)
    out = torch.empty(3, size, size, dtype=torch.float32) if out is None else out
    for c, plane in enumerate(out.numpy()):  # [size,size,3] uint8 -> [3,size,size] float32, by table
        np.take(_LUT[c], a[:, :, c], out=plane)
    return out


def preprocess_batch(images, size, pad_to_square=False, threads=None):
    """PIL images -> [N, 3, size, size], each as `preprocess`, written into its row. Pillow releases
    the GIL while it converts and resizes, so threads (default: one a core) work on several at once."""
    out = torch.empty(len(images), 3, size, size, dtype=torch.float32)
    with ThreadPoolExecutor(max(1, min(len(images), threads or os.cpu_count() or 1))) as pool:
        list(pool.map(lambda i: preprocess(images[i], size, pad_to_square, out=out[i]), range(len(images))))
    return out
