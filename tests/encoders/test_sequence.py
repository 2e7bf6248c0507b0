"""Sequence encoders for acoustic/facial frames."""

from __future__ import annotations

import warnings

import pytest
import torch

from mmtune.encoders import MultiModalSequenceEncoder, SequenceEncoder, SequenceEncoderConfig


def test_padding_does_not_change_a_sample():
    torch.manual_seed(0)
    enc = SequenceEncoder(SequenceEncoderConfig(d_in=5, d_model=16, num_heads=2, d_out=8)).eval()
    x = torch.randn(2, 9, 5)
    lengths = torch.tensor([9, 4])
    batched = enc(x, lengths)
    garbage = x.clone()
    garbage[1, 4:] = 1e3  # padding content must not matter
    torch.testing.assert_close(enc(garbage, lengths), batched)
    torch.testing.assert_close(enc(x[1:, :4]), batched[1:], rtol=1e-5, atol=1e-6)


def test_non_finite_frames_become_zero_with_one_warning():
    torch.manual_seed(0)
    enc = SequenceEncoder(SequenceEncoderConfig(d_in=5, d_model=16, num_heads=2), "audio").eval()
    x = torch.randn(2, 6, 5)
    clean = x.clone()
    x[0, 1, 2], x[1, 3, 0] = float("-inf"), float("nan")
    clean[0, 1, 2] = clean[1, 3, 0] = 0.0
    with pytest.warns(UserWarning, match="audio: 2 non-finite frame values"):
        out = enc(x)
    torch.testing.assert_close(out, enc(clean))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc(x)  # warned once only
    assert torch.isfinite(out).all()


def test_empty_sample_and_bad_shapes():
    enc = SequenceEncoder(SequenceEncoderConfig(d_in=20, d_model=16, num_heads=2), "vision")
    out = enc(torch.randn(2, 3, 20), torch.tensor([3, 0]))
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"vision: frames must have shape \(batch, time, 20\)"):
        enc(torch.randn(2, 3, 35))
    with pytest.raises(ValueError, match="lengths must be"):
        enc(torch.randn(2, 3, 20), torch.tensor([4, 1]))
    with pytest.raises(ValueError, match="must divide d_model"):
        SequenceEncoderConfig(d_in=5, d_model=10, num_heads=4)


def test_multimodal_concatenates_in_order_and_trains():
    torch.manual_seed(0)
    enc = MultiModalSequenceEncoder({
        "audio": SequenceEncoderConfig(d_in=5, d_model=16, num_heads=2, d_out=8),
        "vision": SequenceEncoderConfig(d_in=20, d_model=16, num_heads=2, d_out=4),
    })  # fmt: skip
    frames = {"audio": torch.randn(3, 7, 5), "vision": torch.randn(3, 5, 20)}
    lengths = {"audio": torch.tensor([7, 2, 5]), "vision": torch.tensor([5, 5, 1])}
    out = enc(frames, lengths)
    assert out.shape == (3, 12) and enc.d_out == 12
    enc.eval()
    torch.testing.assert_close(
        enc(frames, lengths)[:, 8:], enc.encoders["vision"](frames["vision"], lengths["vision"])
    )
    enc.train()
    enc(frames, lengths).sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
    with pytest.raises(ValueError, match=r"do not match the encoder's \['audio', 'vision'\]"):
        enc({"audio": frames["audio"]})
