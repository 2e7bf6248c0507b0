"""The LLaVA-style model itself (no method): batches with their spans, placeholders and labels,
and the visual tokens a ViT tower gives (its feature layer's output)."""

from __future__ import annotations

import pytest
import torch
from tests.methods.test_mrt import batch_of, images, tiny_lmm
from tests.tiny_assets import tiny_llm_dir, tiny_vit_dir

from mmtune import MRTConfig, inject_mrt


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmm")
    return tiny_llm_dir(root / "llm"), tiny_vit_dir(root / "vit")


def test_batch_spans_placeholders_and_labels(dirs):
    model = tiny_lmm(dirs)
    b = batch_of(model, answers=True)
    n = model.tower.num_tokens
    assert b.image_mask.sum(1).tolist() == [n, n, 2 * n]
    assert b.num_images == [1, 1, 2]
    assert b.pixel_values.shape[0] == 4
    for i in range(3):
        start, end = int(b.prompt_start[i]), int(b.prompt_end[i])
        assert b.attention_mask[i, :start].sum() == 0 and b.attention_mask[i, start:].all()
        assert b.position_ids[i, start] == 0
        assert (b.labels[i, :end] == -100).all()
        answer = b.labels[i, end:]
        assert (answer != -100).all() and answer[-1] == model.end_of_answer
    with pytest.raises(ValueError, match="sample 0: the prompt has 1 <image> placeholder"):
        model.batch(["<image> what ?"], [images(2)])


def test_vit_visual_tokens_are_the_feature_layers_output(dirs):
    model = tiny_lmm(dirs)
    tower = model.tower
    pixels = tower.preprocess(images(2))
    with torch.no_grad():
        out = tower.encoder.model(pixel_values=pixels, output_hidden_states=True)
        hidden = out.hidden_states[tower.feature_layer]
        expected = hidden[:, hidden.shape[1] - tower.grid * tower.grid :]
        torch.testing.assert_close(tower(pixels), expected, rtol=0, atol=0)
    depth = len(out.hidden_states) - 1
    assert len(tower.blocks) == depth - 1  # feature layer -2: the last block is never read
    with pytest.raises(ValueError, match="outside the encoder's 2 blocks"):
        inject_mrt(model, MRTConfig(vision_layers=[2]))
