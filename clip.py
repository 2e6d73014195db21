"""
The CLIP ViT vision encoder and CLIP image preprocessing, in plain PyTorch + pillow + numpy.

LLaVA sees an image through OpenAI's CLIP ViT-L/14 (224 px for LLaVA v1, 336 px for v1.5). This
file is that tower, written from scratch in the style of OpenAI's CLIP model.py / nanoGPT, and the
exact image preprocessing that CLIP (and therefore LLaVA) was trained with.

Design notes
- Module names mirror the checkpoint keys (`embeddings.patch_embedding`, `pre_layrnorm`, sic,
  `encoder.layers.N.self_attn.q_proj`, ...) as in Hugging Face's `CLIPVisionModel`; the prefixes
  of the files (`vision_model.`, the text tower to ignore) are rows of weights.LAYOUT.
- `forward(x, layer)` takes LLaVA's `vision_feature_layer` index of the hidden states (0: the
  embeddings after `pre_layrnorm`, i: block i's output, -2: the penultimate) and runs no block
  after it: LLaVA never runs the last one.
- Preprocessing reproduces transformers' CLIPImageProcessor bit for bit in one pass: rescale +
  normalize is a 256-entry table per channel computed with the processor's own float arithmetic,
  so it is exact by construction and one gather per pixel.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
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

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    # What transformers' CLIPVisionConfig assumes for a field a config.json leaves out (its defaults
    # are ViT-B/32's, not ours): a sparse HF config must mean what it means to transformers.
    HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=224, patch_size=32,
                       layer_norm_eps=1e-5, num_channels=3, hidden_act="quick_gelu")

    @classmethod
    def from_hf(cls, d):
        """From an HF CLIP vision_config dict, or a full CLIPConfig dict (uses its vision_config)."""
        if "vision_config" in d:
            d = d["vision_config"] or {}
        kw = {f.name: d.get(f.name, cls.HF_DEFAULTS[f.name]) for f in fields(cls)}
        cfg = cls(**kw)
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP vision config: hidden_act {cfg.hidden_act!r} is not supported "
                             f"(expected one of {sorted(ACTIVATIONS)})")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"CLIP vision config: hidden_size {cfg.hidden_size} is not divisible by "
                             f"num_attention_heads {cfg.num_attention_heads}")
        return cfg

    def to_hf(self):
        """The HF vision_config dict (what transformers' CLIPVisionConfig reads)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["model_type"] = "clip_vision_model"
        return d


# -----------------------------------------------------------------------------
# model


def quick_gelu(x):
    # CLIP's cheap GELU approximation; the OpenAI weights were trained with it, so it is not
    # interchangeable with the exact GELU.
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Embeddings(nn.Module):
    """Patchify with a strided conv, prepend the CLS token, add learned absolute positions."""

    def __init__(self, config):
        super().__init__()
        D = config.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(D))
        self.patch_embedding = nn.Conv2d(config.num_channels, D, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, D)

    def forward(self, pixel_values):
        B = pixel_values.shape[0]
        x = self.patch_embedding(pixel_values)                 # [B, D, H/p, W/p]
        x = x.flatten(2).transpose(1, 2)                       # [B, P, D], patches in raster order
        cls = self.class_embedding.expand(B, 1, -1)            # [B, 1, D]
        x = torch.cat([cls, x], dim=1)                         # [B, 1+P, D]
        return x + self.position_embedding.weight              # positions 0..P broadcast over B


class Attention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections; no mask (every patch sees all)."""

    def __init__(self, config):
        super().__init__()
        D = config.hidden_size
        self.n_head = config.num_attention_heads
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x):
        B, T, D = x.shape
        # [B, T, D] -> [B, T, H, hd] -> [B, H, T, hd]
        q, k, v = (proj(x).view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
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
        x = x + self.mlp(self.layer_norm2(x))
        return x


class Encoder(nn.Module):
    # only a container, so that the keys read `encoder.layers.N.*` like the checkpoints
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))


class CLIPVision(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or CLIPVisionConfig()
        self.embeddings = Embeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def num_blocks_for(self, layer):
        """How many blocks must run to produce HF `hidden_states[layer]` (0 = embeddings only)."""
        L = self.config.num_hidden_layers
        n = layer + L + 1 if layer < 0 else layer
        if not 0 <= n <= L:
            raise ValueError(f"CLIP layer {layer} is out of range: this tower has {L} blocks, so "
                             f"hidden states {-(L + 1)}..{L} exist")
        return n

    def forward(self, pixel_values, layer=-1):
        """pixel_values [B, C, S, S] -> HF hidden_states[layer], [B, 1+P, D] with CLS first."""
        c = self.config
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(f"CLIP expects pixel_values [B, {c.num_channels}, {c.image_size}, {c.image_size}], "
                             f"got {list(pixel_values.shape)}")
        n = self.num_blocks_for(layer)
        x = pixel_values.to(self.embeddings.patch_embedding.weight.dtype)
        x = self.pre_layrnorm(self.embeddings(x))             # hidden_states[0]
        for block in self.encoder.layers[:n]:                  # early stop: later blocks never run
            x = block(x)
        return x

    def pooled(self, pixel_values):
        """CLIP's pooled output (HF pooler_output): post_layernorm of the last layer's CLS token."""
        return self.post_layernorm(self(pixel_values, layer=-1)[:, 0])

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """A directory with config.json (CLIPModel or CLIPVisionModel) and safetensors, or a Hub
        name (openai/clip-vit-large-patch14-336), downloaded once into the cache."""
        path = weights.fetch(path, files=["config.json"])
        with torch.device("meta"):
            model = cls(weights.read_config(path, CLIPVisionConfig.from_hf, "CLIP config"))
        model = weights.assign_weights(model, weights.read_weights(path), path, dtype, device, part="vision_tower.")
        return model.eval()


# -----------------------------------------------------------------------------
# images

MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's per-channel pixel statistics
STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(x * 255) for x in MEAN)  # (122, 116, 104): LLaVA-1.5 expand2square background


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
    # As transformers' convert_to_rgb: anything with transparency is composited onto white (a plain
    # convert would expose whatever colour hides under alpha 0), everything else converts directly.
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _expand2square(img, color=PAD_COLOR):
    # LLaVA-1.5's expand2square: centre the image on a square canvas of the mean colour
    w, h = img.size
    if w == h:
        return img
    canvas = Image.new(img.mode, (max(w, h),) * 2, color)
    canvas.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return canvas


def _normalize_lut():
    # transformers rescales in float64 and casts to float32, then normalizes in float32:
    #   x = float32(u8 * (1/255)); y = (x - mean) / std
    # A uint8 input has only 256 values per channel, so we run exactly that arithmetic once on all
    # of them: the result is bit-identical and preprocessing becomes one table lookup per pixel.
    x = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)  # [256]
    mean = np.array(MEAN, dtype=np.float32)[:, None]
    std = np.array(STD, dtype=np.float32)[:, None]
    return (x[None, :] - mean) / std                                      # [3, 256] float32


_LUT = _normalize_lut()


def _resize_and_crop(img, size):
    """Resize the short side to `size` (long side int(size * long / short)), centre crop at offset
    (extent - size) // 2 -> uint8 array [size, size, 3]."""
    w, h = img.size
    if w <= h:  # tall (or square): short side is the width
        nh = int(size * h / w)
        top = (nh - size) // 2
        return np.asarray(img.resize((size, nh), Image.BICUBIC))[top:top + size]
    # Wide. Pillow resizes in two passes, horizontal then vertical, rounding to uint8 in between.
    # Doing the passes as two calls is therefore the same computation, and lets us drop the
    # columns the crop discards before the (column-independent) vertical pass.
    nw = int(size * w / h)
    left = (nw - size) // 2
    img = img.resize((nw, h), Image.BICUBIC).crop((left, 0, left + size, h))
    return np.asarray(img.resize((size, size), Image.BICUBIC))


def _pad_wide_and_resize(img, size):
    """LLaVA-1.5's padded square of a wide RGB picture, resized -> uint8 [size, size, 3], without
    making the square. Pillow's horizontal pass resizes each row alone, and a row of one colour
    comes out as that colour (an output pixel's integer weights sum to 2^22 within a few units,
    nowhere near half a level). So only the picture's own h rows go through that pass, the w - h
    rows of padding are filled in, and Pillow's vertical pass runs on the assembled rows. For a
    640x427 photo this skips a third of the horizontal pass and the 640x640 canvas."""
    w, h = img.size
    rows = Image.new("RGB", (size, w), PAD_COLOR)  # the square's w rows after the horizontal pass
    rows.paste(img.resize((size, h), Image.BICUBIC), (0, (w - h) // 2))  # centred, as expand2square
    return np.asarray(rows.resize((size, size), Image.BICUBIC))


def preprocess(pil_image, size, pad_to_square=False, out=None):
    """PIL image -> float32 tensor [3, size, size], bit-exact with transformers' CLIPImageProcessor
    (size={"shortest_edge": size}, crop_size=size; with pad_to_square, LLaVA-1.5's "pad" aspect
    mode, i.e. LlavaImageProcessor(do_pad=True)). `out`: a contiguous float32 [3, size, size]
    CPU tensor to write into (preprocess_batch passes the rows of its batch) instead of a new one.

    RGB (alpha onto white) -> [pad to a square of the mean colour] -> resize the short side to
    `size` with PIL bicubic on uint8, long side int(size * long / short) -> centre crop at offset
    (extent - size) // 2 -> rescale /255 and normalize with CLIP's mean/std.
    """
    img = _rgb(pil_image)
    if pad_to_square and img.width > img.height:
        a = _pad_wide_and_resize(img, size)
    else:
        a = _resize_and_crop(_expand2square(img) if pad_to_square else img, size)
    out = torch.empty(3, size, size, dtype=torch.float32) if out is None else out
    planes = out.numpy()                                    # the same memory, as numpy
    for c in range(3):                                      # HWC uint8 -> CHW float32 via the table
        np.take(_LUT[c], a[:, :, c], out=planes[c])
    return out


def preprocess_batch(images, size, pad_to_square=False, threads=None):
    """A list of PIL images -> [N,3,size,size], each exactly as `preprocess`. Pillow releases
    the GIL while it converts and resizes, so threads work on several pictures at once (default:
    one per CPU core); the result does not depend on the number of threads. Each picture is
    written straight into its row of the batch: no tensor per picture and no stack copy at the
    end."""
    out = torch.empty(len(images), 3, size, size, dtype=torch.float32)
    threads = min(len(images), threads or os.cpu_count() or 1)
    if threads <= 1:
        for img, row in zip(images, out):
            preprocess(img, size, pad_to_square, out=row)
        return out
    # Largest pictures first, so that no thread is left resizing a big one while the others idle.
    order = sorted(range(len(images)), key=lambda i: -images[i].width * images[i].height)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: preprocess(images[i], size, pad_to_square, out=out[i]), order))
    return out
