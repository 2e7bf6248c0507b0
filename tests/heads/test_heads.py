"""Heads, losses, pooling and prompt templates on tiny inputs."""

from __future__ import annotations

import pytest
import torch

from mmtune.data import DEFAULT_PROMPTS, PromptTemplate
from mmtune.heads import (
    ClassificationHead,
    RegressionHead,
    SegmentationDecoder,
    SegmentationDecoderConfig,
    TaskToken,
    dice_loss,
    pool_last_token,
    position_ids_from_mask,
    regression_loss,
    segmentation_loss,
)


@pytest.mark.parametrize(
    "levels",
    [
        [(8, 28, 28), (16, 14, 14), (24, 7, 7)],  # a CNN: strides 8/16/32
        [(16, 6, 6), (16, 6, 6), (16, 6, 6)],  # a ViT: three layers on one patch grid
    ],
    ids=["cnn", "vit"],
)
def test_segmentation_decoder_forward_backward(levels):
    torch.manual_seed(0)
    dec = SegmentationDecoder(
        tuple(c for c, _, _ in levels),
        d_text=20,
        config=SegmentationDecoderConfig(channels=16, num_heads=2),
    )
    feats = [torch.randn(2, c, h, w) for c, h, w in levels]
    text = torch.randn(2, 20, requires_grad=True)
    logits = dec(feats, text, size=(50, 70))
    assert logits.shape == (2, 1, 50, 70)
    target = torch.zeros(2, 1, 50, 70)
    target[:, :, 10:30, 20:50] = 1
    loss = segmentation_loss(logits, target, bce_weight=0.5)
    loss.backward()
    assert all(p.grad is not None for p in dec.parameters())
    assert text.grad is not None and text.grad.abs().sum() > 0  # the text steers the mask
    with pytest.raises(ValueError, match=r"feature level 1 must be \(B=2, "):
        dec([feats[0], torch.randn(2, 3, 5, 5), feats[2]], text, size=(50, 70))


def test_segmentation_decoder_learns_a_text_dependent_mask():
    torch.manual_seed(0)
    dec = SegmentationDecoder(
        (4, 4, 4), d_text=2, config=SegmentationDecoderConfig(channels=16, num_heads=2)
    )
    feats = [torch.zeros(2, 4, s, s) for s in (8, 4, 2)]
    text = torch.eye(2)  # sample 0 asks for the left half, sample 1 for the right half
    target = torch.zeros(2, 1, 16, 16)
    target[0, :, :, :8], target[1, :, :, 8:] = 1, 1
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    for _ in range(150):
        loss = dice_loss(dec(feats, text, (16, 16)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1  # same image features, different masks: read from the text


def test_dice_and_regression_losses_against_hand_computed_values():
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    logits = torch.tensor([[[[20.0, -20.0], [-20.0, -20.0]]]])  # p ~ [1, 0, 0, 0]
    # 1 - (2*1 + 1) / (1 + 2 + 1) = 0.25 with eps = 1
    assert dice_loss(logits, target).item() == pytest.approx(0.25, abs=1e-6)
    assert dice_loss(torch.full_like(target, 30.0) * (2 * target - 1), target).item() < 1e-6
    pred, true = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 0.0, 1.0])
    assert regression_loss(pred, true).item() == pytest.approx(((0 + 4 + 9) / 3) ** 0.5, rel=1e-6)
    assert regression_loss(pred, true, "l1").item() == pytest.approx(5 / 3)
    with pytest.raises(ValueError, match="'rmse' or 'l1'"):
        regression_loss(pred, true, "huber")


def test_classification_and_regression_heads():
    head = ClassificationHead(d_image=6, d_text=10, num_classes=3, hidden=16)
    out = head(torch.randn(4, 6), torch.randn(4, 10))
    assert out.shape == (4, 3)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 1])).backward()
    assert all(p.grad is not None for p in head.parameters())
    with pytest.raises(ValueError, match=r"image vector must be \(4, 6\); got \(4, 5\)"):
        head(torch.randn(4, 5), torch.randn(4, 10))
    text_only = ClassificationHead(d_image=0, d_text=10, num_classes=3)
    assert text_only(None, torch.randn(2, 10)).shape == (2, 3)
    reg = RegressionHead(10)
    assert reg(torch.randn(5, 10)).shape == (5,)
    with pytest.raises(ValueError, match=r"text vector must be \(B, 10\)"):
        reg(torch.randn(5, 11))


def test_last_token_pooling_for_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool_last_token(hidden, right).flatten().tolist() == [1.0, 7.0]
    assert pool_last_token(hidden, left).flatten().tolist() == [3.0, 7.0]
    assert position_ids_from_mask(left).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="no real token"):
        pool_last_token(hidden, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_task_token_goes_right_after_the_last_real_token(side):
    token = TaskToken(3, init=torch.full((3,), 9.0))
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 3, 3) + 100
    mask = (
        torch.tensor([[1, 1, 0], [1, 1, 1]])
        if side == "right"
        else torch.tensor([[0, 1, 1], [1, 1, 1]])
    )
    embeds, new_mask, index = token.insert(x, mask)
    assert embeds.shape == (2, 4, 3) and new_mask.shape == (2, 4)
    for b in range(2):
        assert torch.equal(embeds[b, index[b]], torch.full((3,), 9.0))
        real = x[b][mask[b].bool()]
        kept = embeds[b][new_mask[b].bool()]
        assert torch.equal(kept[:-1], real) and torch.equal(kept[-1], torch.full((3,), 9.0))
    assert index.tolist() == ([2, 3] if side == "right" else [3, 3])
    embeds.sum().backward()
    assert token.embedding.grad is not None


def test_prompt_templates():
    seg = PromptTemplate(DEFAULT_PROMPTS["segmentation"])
    assert seg(expression=" the red car ") == (
        "Segment the the red car according to the text. #Segmentation:"
    )
    assert seg.fields == {"expression"}
    with pytest.raises(KeyError, match=r"needs \['expression'\]; the sample has \['text'\]"):
        seg(text="x")
    with pytest.raises(ValueError, match="has no"):
        PromptTemplate("no fields here")
    for template in DEFAULT_PROMPTS.values():
        PromptTemplate(template)
