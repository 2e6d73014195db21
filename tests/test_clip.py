"""clip.py against transformers: the vision tower's hidden states, the checkpoint layouts it loads,
the image preprocessing bit for bit, and the errors for bad weights and bad images."""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clip  # noqa: E402
from clip import CLIPVision, CLIPVisionConfig, preprocess  # noqa: E402
from weights import WeightsError, read_weights  # noqa: E402

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

# A tiny tower whose image size is not 224, so nothing can silently assume the default.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=30, patch_size=6)
TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _randomize(model, seed=0):
    # HF's init leaves LayerNorms at 1/0 and biases at 0; random values make every weight count
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A full CLIPModel (text + vision towers, projections, logit_scale) as save_pretrained writes it."""
    d = tmp_path_factory.mktemp("clip_full")
    cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=8)
    model = _randomize(transformers.CLIPModel(cfg))
    model.save_pretrained(d)
    return d, model.vision_model


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
    """A transformers 5 CLIPVisionModel save: keys without `vision_model.`; an unusual LN eps."""
    d = tmp_path_factory.mktemp("clip_vision")
    model = _randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION, layer_norm_eps=0.1)), 1)
    model.save_pretrained(d)
    return d, model


def _pixels(n=2, size=30, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# the tower


@pytest.mark.parametrize("which", ["clip_dir", "vision_dir"])
def test_hidden_states_match_transformers(which, request):
    path, hf = request.getfixturevalue(which)
    ours = CLIPVision.from_pretrained(path)
    x = _pixels()
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True)
        L = ours.config.num_hidden_layers
        assert len(ref.hidden_states) == L + 1
        for layer in range(-(L + 1), L + 1):  # every index HF has, negative and positive
            got = ours(x, layer=layer)
            assert got.shape == (2, 1 + 25, 32)
            torch.testing.assert_close(got, ref.hidden_states[layer], atol=1e-4, rtol=0)
        torch.testing.assert_close(ours(x), ref.last_hidden_state, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.pooled(x), ref.pooler_output, atol=1e-4, rtol=0)


def test_layer_minus_two_never_runs_the_last_block(clip_dir):
    model = CLIPVision.from_pretrained(clip_dir[0])
    calls = []
    for i, block in enumerate(model.encoder.layers):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    with torch.no_grad():
        model(_pixels(1), layer=-2)
    assert calls == [0, 1]
    with pytest.raises(ValueError, match="layer 4 is out of range"):
        model(_pixels(1), layer=4)
    with pytest.raises(ValueError, match=r"\[B, 3, 30, 30\]"):
        model(_pixels(1, size=32))


def test_dtype_device_and_state_dict_keys(clip_dir, vision_dir):
    model = CLIPVision.from_pretrained(clip_dir[0], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert model(_pixels(1)).dtype == torch.bfloat16  # fp32 pixels are cast to the weights' dtype
    # our names are the HF names without a prefix: the transformers 5 vision save, key for key
    assert set(model.state_dict()) == set(load_file(vision_dir[0] / "model.safetensors"))


def test_config_from_hf_and_back():
    full = json.loads(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION).to_json_string())
    cfg = CLIPVisionConfig.from_hf(full)  # a full CLIPConfig: uses its vision_config
    assert (cfg.hidden_size, cfg.image_size, cfg.patch_size, cfg.num_patches) == (32, 30, 6, 25)
    # a sparse dict means what it means to transformers (whose defaults are ViT-B/32's)
    sparse = {"hidden_size": 96, "image_size": 64}
    hf = transformers.CLIPVisionConfig(**sparse)
    ours = CLIPVisionConfig.from_hf(sparse)
    for k, v in ours.to_hf().items():
        assert getattr(hf, k) == v, k
    assert CLIPVisionConfig.from_hf(ours.to_hf()) == ours
    assert CLIPVisionConfig().num_patches == 256 and CLIPVisionConfig(image_size=336).num_patches == 576
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPVisionConfig.from_hf({"hidden_act": "relu6"})


def test_prefix_rules_openai_layout(clip_dir, tmp_path):
    """An older OpenAI-style file also stores `position_ids` buffers: they and the text tower are
    ignored; an unknown key is named by the loader."""
    path, hf = clip_dir
    state = load_file(path / "model.safetensors")
    state["vision_model.embeddings.position_ids"] = torch.arange(26)[None]
    state["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    d = tmp_path / "old"
    _copy_config(path, d)
    save_file(state, str(d / "model.safetensors"))
    assert set(read_weights(d)) == {"vision_tower." + k[len("vision_model."):] for k in state
                                    if k.startswith("vision_model.") and "position_ids" not in k}
    model = CLIPVision.from_pretrained(d)
    with torch.no_grad():
        torch.testing.assert_close(model(_pixels(), -2), hf(_pixels(), output_hidden_states=True).hidden_states[-2],
                                   atol=1e-4, rtol=0)
    state["vision_model.extra.weight"] = torch.zeros(1)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"unexpected keys: extra\.weight"):
        CLIPVision.from_pretrained(d)


# -----------------------------------------------------------------------------
# weight errors


def _copy_config(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_missing_weights_file(clip_dir, tmp_path):
    _copy_config(clip_dir[0], tmp_path / "m")
    with pytest.raises(WeightsError, match=r"no model\.safetensors.*" + str(tmp_path / "m")):
        CLIPVision.from_pretrained(tmp_path / "m")


def test_missing_config(clip_dir, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes((clip_dir[0] / "model.safetensors").read_bytes())
    with pytest.raises(WeightsError, match=r"config\.json"):
        CLIPVision.from_pretrained(d)
    with pytest.raises(WeightsError, match="nothere"):
        CLIPVision.from_pretrained(tmp_path / "nothere")


def test_misshaped_and_missing_keys_are_named(vision_dir, tmp_path):
    src = vision_dir[0]
    state = load_file(src / "model.safetensors")
    state["encoder.layers.1.mlp.fc1.weight"] = state["encoder.layers.1.mlp.fc1.weight"][:-1].clone()
    del state["post_layernorm.bias"]
    d = tmp_path / "bad"
    _copy_config(src, d)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(WeightsError) as e:
        CLIPVision.from_pretrained(d)
    msg = str(e.value)
    assert "encoder.layers.1.mlp.fc1.weight (expected [64, 32], found [63, 32])" in msg
    assert "missing keys: post_layernorm.bias" in msg and str(d) in msg


# -----------------------------------------------------------------------------
# preprocessing: bit for bit against transformers


def _photos():
    """Real photos from scikit-image's bundled data (RGB, grayscale, RGBA), or, where it is not
    available offline, pillow-made stand-ins of the same sizes and modes."""
    try:
        import skimage.data as sk
        out = {n: Image.fromarray(getattr(sk, n)()) for n in
               ("astronaut", "coffee", "chelsea", "camera", "rocket", "logo", "page")}
    except Exception:  # no scikit-image or no data: gradients + noise stand in
        rng = np.random.default_rng(0)

        def made(h, w, c):
            yy, xx = np.mgrid[0:h, 0:w]
            a = (xx * 255 // w + yy * 128 // h)[..., None] + rng.integers(0, 60, (h, w, c))
            return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8).squeeze())
        out = {"astronaut": made(512, 512, 3), "coffee": made(400, 600, 3), "chelsea": made(300, 451, 3),
               "camera": made(512, 512, 1), "rocket": made(427, 640, 3), "logo": made(500, 500, 4),
               "page": made(191, 384, 1)}
    a = out["astronaut"]
    rgba = a.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, a.width).astype(np.uint8), (a.height, 1))
    rgba.putalpha(Image.fromarray(alpha))  # a smooth alpha ramp: compositing must be exact
    pal = out["chelsea"].quantize(64)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0  # palette index 0 is transparent
    out.update({
        "rgba_ramp": rgba,
        "palette": pal,
        "palette_transparent": pal_t,
        "la": out["camera"].convert("LA"),
        "cmyk": out["coffee"].convert("CMYK"),
        "bilevel": out["camera"].convert("1"),
        "int16": out["camera"].convert("I;16"),
        "tall": a.crop((100, 0, 300, 512)),             # 200 x 512
        "wide": out["rocket"].crop((0, 150, 640, 250)),  # 640 x 100
        "odd": out["coffee"].crop((3, 5, 340, 228)),     # odd sizes: crop offsets round down
        "tiny": out["chelsea"].resize((9, 7)),           # smaller than size: upsampled
        "thin": out["coffee"].crop((0, 0, 4, 37)),
    })
    return out


PHOTOS = _photos()


def _hf(cls, size, **kw):
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **kw)


def _processors(size):
    """CLIPImageProcessor as users get it (it falls back to the PIL backend without torchvision)
    and, explicitly, the slow PIL/numpy one."""
    procs = [_hf(transformers.CLIPImageProcessor, size)]
    if hasattr(transformers, "CLIPImageProcessorPil"):
        procs.append(_hf(transformers.CLIPImageProcessorPil, size))
    return [p for p in procs if getattr(p, "backend", "pil") == "pil"]  # torchvision: not bit-exact


@pytest.mark.parametrize("size", [224, 336, 30])
def test_preprocess_bit_exact(size):
    procs = _processors(size)
    for name, img in PHOTOS.items():
        ours = preprocess(img, size)
        assert ours.dtype == torch.float32 and ours.shape == (3, size, size), name
        for p in procs:
            ref = p(img, return_tensors="np")["pixel_values"][0]
            assert np.array_equal(ours.numpy(), ref), f"{name} differs from {type(p).__name__} at {size}"


def _expand2square(img, color):
    # LLaVA-1.5's llava/mm_utils.py expand2square, verbatim in behaviour
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), color)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


@pytest.mark.parametrize("size", [224, 336])
def test_preprocess_pad_to_square_bit_exact(size):
    from transformers.image_transforms import convert_to_rgb
    assert clip.PAD_COLOR == (122, 116, 104)
    # the official recipe: expand2square with the processor's mean colour, then CLIPImageProcessor
    clip_procs = _processors(size)
    llava = [_hf(getattr(transformers, n), size, do_pad=True)
             for n in ("LlavaImageProcessorPil", "LlavaImageProcessor") if hasattr(transformers, n)]
    llava = [p for p in llava if getattr(p, "backend", "pil") == "pil"]
    color = tuple(int(x * 255) for x in clip_procs[0].image_mean)
    for name, img in PHOTOS.items():
        ours = preprocess(img, size, pad_to_square=True).numpy()
        squared = _expand2square(Image.fromarray(convert_to_rgb(img, return_numpy=True)), color)
        for p in clip_procs:
            assert np.array_equal(ours, p(squared, return_tensors="np")["pixel_values"][0]), name
        for p in llava:  # llava-hf's processor with do_pad does the same in one call
            assert np.array_equal(ours, p(img, return_tensors="np")["pixel_values"][0]), name


def test_preprocess_pad_wide_shapes_bit_exact():
    # preprocess never builds a wide picture's padded square (it fills the padding rows in after
    # the horizontal pass), so check it against the square itself on noise, the hardest content
    # for rounding, over aspect ratios from nearly square to one row, up- and downsampled
    proc = _processors(64)[0]
    color = tuple(int(x * 255) for x in proc.image_mean)
    rng = np.random.default_rng(0)
    shapes = [(65, 64), (64, 63), (500, 1), (333, 2), (40, 39), (7, 3), (1000, 130), (129, 128)]
    shapes += [(int(w), int(rng.integers(1, w))) for w in rng.integers(2, 700, size=12)]
    for w, h in shapes:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = proc(_expand2square(img, color), return_tensors="np")["pixel_values"][0]
        assert np.array_equal(preprocess(img, 64, pad_to_square=True).numpy(), ref), (w, h)


@pytest.mark.parametrize("threads", [1, 3])
def test_preprocess_batch_threads_bit_exact(threads):
    # the whole mixed list (modes, sizes) in one processor call is the reference
    names = sorted(PHOTOS)
    images = [PHOTOS[n] for n in names]
    ours = clip.preprocess_batch(images, 224, threads=threads)
    ref = _processors(224)[0](images, return_tensors="np")["pixel_values"]
    assert ours.shape == (len(images), 3, 224, 224)
    assert np.array_equal(ours.numpy(), ref)
    padded = clip.preprocess_batch(images, 64, pad_to_square=True, threads=threads)
    assert all(torch.equal(padded[i], preprocess(img, 64, pad_to_square=True)) for i, img in enumerate(images))


def test_preprocess_square_input_unchanged_by_padding():
    img = PHOTOS["astronaut"]
    assert torch.equal(preprocess(img, 224, pad_to_square=True), preprocess(img, 224))


# -----------------------------------------------------------------------------
# loading images


def test_load_image_roundtrip(tmp_path):
    f = tmp_path / "photo.png"
    PHOTOS["chelsea"].save(f)
    img = clip.load_image(f)
    assert img.size == (451, 300)
    assert np.array_equal(np.asarray(img), np.asarray(PHOTOS["chelsea"]))


def test_load_image_missing(tmp_path):
    with pytest.raises(clip.ImageError, match="not found: .*nope.jpg"):
        clip.load_image(tmp_path / "nope.jpg")


def test_load_image_corrupt(tmp_path):
    buf = io.BytesIO()
    PHOTOS["coffee"].save(buf, format="JPEG")
    truncated = tmp_path / "truncated.jpg"  # a valid header, then the data stops
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(clip.ImageError, match="cannot read image .*truncated.jpg"):
        clip.load_image(truncated)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all")
    with pytest.raises(clip.ImageError, match="cannot read image .*garbage.png"):
        clip.load_image(garbage)
    png = io.BytesIO()
    PHOTOS["camera"].save(png, format="PNG")
    broken = bytearray(png.getvalue())
    broken[200:260] = bytes(60)  # corrupt compressed data inside the IDAT chunk
    bad = tmp_path / "broken.png"
    bad.write_bytes(bytes(broken))
    with pytest.raises(clip.ImageError, match="cannot read image .*broken.png"):
        clip.load_image(bad)
