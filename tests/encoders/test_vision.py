"""Vision encoders: the real embedded MobileNetV2, tiny HF encoders, preprocessing, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)

from mmtune.encoders import (
    ImagePreprocess,
    MobileNetV2Encoder,
    encode_images,
    load_vision_encoder,
    to_rgb_array,
    vision_encoders,
)
from mmtune.encoders.hf_vision import _preprocess_from_processor
from mmtune.utils.cache import FeatureCache

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "image_size": 32, "patch_size": 8}  # fmt: skip


@pytest.fixture(scope="module")
def mobilenet():
    return load_vision_encoder("mobilenet-v2")


@pytest.mark.slow
def test_real_mobilenet_recognises_scikit_image_samples(mobilenet):
    assert "mobilenet-v2" in vision_encoders()
    logits = mobilenet.classify(
        mobilenet.preprocess([skimage.data.chelsea(), skimage.data.coffee()])
    )
    top = logits.argmax(-1).tolist()
    assert 281 <= top[0] <= 285  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert top[1] == 967  # espresso
    assert not any(p.requires_grad for p in mobilenet.parameters())


@pytest.mark.slow
def test_mobilenet_feature_shapes_and_frozen_batchnorm(mobilenet):
    feats = mobilenet.encode([skimage.data.astronaut(), skimage.data.camera()])
    assert feats.pooled.shape == (2, 1280)
    assert [tuple(x.shape) for x in feats.levels] == [(2, 32, 28, 28), (2, 96, 14, 14),
                                                      (2, 1280, 7, 7)]  # fmt: skip
    assert not mobilenet.training  # BatchNorm uses the ImageNet running statistics
    # the pooled vector is what the ImageNet classifier reads
    torch.testing.assert_close(
        mobilenet.net.classifier(feats.pooled),
        mobilenet.net(mobilenet.preprocess([skimage.data.astronaut(), skimage.data.camera()])),
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=16, **TINY)),
        lambda: SiglipVisionModel(SiglipVisionConfig(**TINY)),
        lambda: ViTModel(ViTConfig(**TINY)),
    ],
    ids=["clip", "siglip", "vit"],
)
def test_hf_vision_encoders_give_a_global_vector_and_three_grids(build):
    torch.manual_seed(0)
    model = build()
    enc = load_vision_encoder(model, layers=(1, 2, 4))
    feats = enc.encode([skimage.data.chelsea(), skimage.data.camera()])
    d = 16 if isinstance(model, CLIPVisionModelWithProjection) else 32
    assert enc.d_global == d and feats.pooled.shape == (2, d)
    assert [tuple(x.shape) for x in feats.levels] == [(2, 32, 4, 4)] * 3
    # level 2 is layer 2's hidden state with the prefix token(s) dropped, on the 4x4 grid
    pixels = enc.preprocess([skimage.data.chelsea(), skimage.data.camera()])
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(feats.levels[1].flatten(2).transpose(1, 2), hidden[:, -16:])


def test_full_clip_checkpoint_by_path_gives_its_projected_image_embeds(tmp_path):
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "vocab_size": 99},
        vision_config=TINY, projection_dim=16,
    ))  # fmt: skip
    clip.save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}
                       ).save_pretrained(tmp_path)  # fmt: skip
    enc = load_vision_encoder(str(tmp_path), layers=(1, 2, 4))
    assert (enc.preprocess.size, enc.preprocess.resize, enc.preprocess.interpolation) == (
        32, 36, "bicubic")  # fmt: skip
    image = skimage.data.coffee()
    with torch.no_grad():
        ref = clip.get_image_features(pixel_values=enc.preprocess([image]))
    ref = ref if torch.is_tensor(ref) else ref.pooler_output
    torch.testing.assert_close(enc.encode([image]).pooled, ref)


def test_clip_preprocessing_matches_the_hf_processor():
    processor = CLIPImageProcessor()  # CLIP's defaults: bicubic, shortest edge 224, crop 224
    ours = _preprocess_from_processor(processor, 224)
    for image in (skimage.data.chelsea(), skimage.data.coffee()):
        ref = processor(images=image, return_tensors="pt")["pixel_values"]
        got = ours([image])
        assert got.shape == ref.shape == (1, 3, 224, 224)
        assert (got - ref).abs().mean() < 0.01  # PIL vs torch antialiased bicubic


def test_feature_cache_for_an_image_set(tmp_path):
    torch.manual_seed(0)
    enc = load_vision_encoder(ViTModel(ViTConfig(**TINY)), layers=(1, 2, 4))
    images = [skimage.data.chelsea(), skimage.data.camera(), skimage.data.coffee()]
    cache = FeatureCache(tmp_path)
    first = encode_images(enc, images, batch_size=2, cache=cache)
    assert cache.last_hit is False
    second = encode_images(enc, images, batch_size=2, cache=cache)
    assert cache.last_hit is True
    assert set(first) == {"pooled", "level0", "level1", "level2"}
    torch.testing.assert_close(first["pooled"], enc.encode(images).pooled)
    for k in first:
        assert torch.equal(first[k], second[k])
    changed = [images[0], images[1], images[2][::-1]]
    encode_images(enc, changed, batch_size=2, cache=cache)
    assert cache.last_hit is False  # other input content
    enc.preprocess = ImagePreprocess(size=32, resize=40, mean=(0.5,) * 3, std=(0.5,) * 3)
    encode_images(enc, images, batch_size=2, cache=cache)
    assert cache.last_hit is False  # other preprocessing


def test_a_repeated_image_is_encoded_once(tmp_path):
    torch.manual_seed(0)
    enc = load_vision_encoder(ViTModel(ViTConfig(**TINY)), layers=(1, 2, 4))
    cat, camera = skimage.data.chelsea(), skimage.data.camera()
    path = tmp_path / "camera.png"
    Image.fromarray(camera).save(path)
    # the same pixels three times (one as a copy), the same file twice (once by another name)
    images = [cat, path, cat.copy(), str(tmp_path / "." / "camera.png"), cat]
    seen: list[int] = []
    encode = enc.encode
    enc.encode = lambda batch: (seen.append(len(batch)), encode(batch))[1]
    got = encode_images(enc, images, batch_size=4)
    assert sum(seen) == 2  # two distinct images, one pass each
    want = encode([cat, camera, cat, camera, cat])
    torch.testing.assert_close(got["pooled"], want.pooled)
    for i in range(3):
        torch.testing.assert_close(got[f"level{i}"], want.levels[i])


# ----------------------------------------------------------------------------- input handling


def test_grayscale_rgba_palette_and_float_images(tmp_path):
    gray = skimage.data.camera()
    assert to_rgb_array(gray).shape == (512, 512, 3)
    assert (to_rgb_array(gray)[..., 0] == gray).all()
    rgba = np.dstack([skimage.data.coffee(), np.full((400, 600), 7, np.uint8)])
    assert (to_rgb_array(rgba) == skimage.data.coffee()).all()  # alpha dropped
    assert to_rgb_array(Image.fromarray(rgba, "RGBA")).shape == (400, 600, 3)
    assert to_rgb_array(Image.fromarray(gray).convert("P")).shape == (512, 512, 3)
    assert to_rgb_array(np.ones((4, 5, 1))).max() == 255
    path = tmp_path / "a.png"
    Image.fromarray(gray).save(path)
    assert (to_rgb_array(path) == to_rgb_array(gray)).all()


def test_bad_images_name_the_problem(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg: cannot decode as an image"):
        to_rgb_array(broken)
    with pytest.raises(FileNotFoundError, match=r"missing\.png: no such image file"):
        to_rgb_array(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"shape \(3, 4, 5\) is not an image"):
        to_rgb_array(np.zeros((3, 4, 5)))
    with pytest.raises(ValueError, match=r"in \[0, 1\]; got range \[0, 16\]"):
        to_rgb_array(np.linspace(0, 16, 64).reshape(8, 8))  # sklearn digits are 0..16: rescale
    with pytest.raises(ValueError, match="image 1"):
        ImagePreprocess()([np.zeros((8, 8)), np.zeros((2, 2, 2))])


def test_bad_pixels_and_sources_name_the_problem(tmp_path):
    enc = MobileNetV2Encoder(pretrained=False)
    with pytest.raises(ValueError, match=r"must be 224x224 .*got \(32, 32\)"):
        enc(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"must be \(B, 3, H, W\)"):
        enc(torch.zeros(3, 224, 224))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a vision model directory"):
        load_vision_encoder(str(tmp_path))
    with pytest.raises(ValueError, match=r"three 1-based layer numbers in 1\.\.4"):
        load_vision_encoder(ViTModel(ViTConfig(**TINY)), layers=(1, 2, 5))
