"""One infused layer: the maps of I, the per-head gate and the K/V and FF infusion (eqs. 1-7)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmtune.methods.mit.config import Form, Gate, MiTConfig


class LayerMaps(NamedTuple):
    """The modality maps of one layer for one batch, each (B, width); absent maps are None."""

    k_scale: torch.Tensor | None
    k_shift: torch.Tensor | None
    v_scale: torch.Tensor | None
    v_shift: torch.Tensor | None
    probe: torch.Tensor | None  # P(I), compared with the raw values in the head gate
    ff_scale: torch.Tensor | None


def _affine(d_in: int, d_out: int, bias_value: float, **factory: Any) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, **factory)
    nn.init.zeros_(layer.weight)
    nn.init.constant_(layer.bias, bias_value)
    return layer


class MiTLayer(nn.Module):
    """The infusion parameters of one decoder layer and the formulas that use them."""

    def __init__(
        self,
        config: MiTConfig,
        *,
        d_kv: int,
        num_kv_heads: int,
        d_ff: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if d_kv % num_kv_heads:
            raise ValueError(f"d_kv={d_kv} is not divisible by num_kv_heads={num_kv_heads}")
        self.form: Form = config.form
        self.gate_kind: Gate = config.gate
        self.d_kv, self.num_kv_heads, self.d_ff = d_kv, num_kv_heads, d_ff
        self.head_dim = d_kv // num_kv_heads
        f = {"device": device, "dtype": dtype}
        d_i = config.d_modality
        # map_rank: I -> A I (B, r) once per layer, and every map reads that instead of I
        self.map_down = None
        if config.map_rank is not None:
            self.map_down = nn.Linear(d_i, config.map_rank, bias=False, **f)  # A: random init
            d_i = config.map_rank
        self.k_scale = self.k_shift = self.v_scale = self.v_shift = None
        self.gate_proj = self.ff_scale = None
        self.gate_logit = self.gate_beta = None
        if config.kv_infusion:
            self.k_scale = _affine(d_i, d_kv, 1.0, **f)
            self.k_shift = _affine(d_i, d_kv, 0.0, **f)
            self.v_scale = _affine(d_i, d_kv, 1.0, **f)
            self.v_shift = _affine(d_i, d_kv, 0.0, **f)
        if config.head_rescaling:
            self.gate_proj = nn.Linear(d_i, d_kv, bias=False, **f)  # P: random init
            self.gate_logit = nn.Parameter(torch.zeros(num_kv_heads, **f))  # L
            if config.gate == "centered":
                self.gate_beta = nn.Parameter(torch.zeros(num_kv_heads, **f))
        if config.ff_infusion:
            self.ff_scale = _affine(d_i, d_ff, 1.0, **f)

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def maps(self, modality: torch.Tensor) -> LayerMaps:
        """Eq. 1: all maps of ``modality`` (B, d_I) for this layer."""
        i = modality.to(self.param_dtype)
        if self.map_down is not None:
            i = self.map_down(i)  # (B, r)

        def apply(m: nn.Module | None) -> torch.Tensor | None:
            return None if m is None else m(i)

        return LayerMaps(
            apply(self.k_scale),
            apply(self.k_shift),
            apply(self.v_scale),
            apply(self.v_shift),
            apply(self.gate_proj),
            apply(self.ff_scale),
        )

    def head_gate(self, values: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
        """Eqs. 4-5: the per-token, per-head gate from raw values (B, T, d_kv) -> (B, T, Hkv, 1)."""
        b, t, _ = values.shape
        v = values.to(probe.dtype).view(b, t, self.num_kv_heads, self.head_dim)  # (B, T, H, Dh)
        p = probe.view(probe.shape[0], 1, self.num_kv_heads, self.head_dim)  # (B, 1, H, Dh)
        cos = F.cosine_similarity(v, p, dim=-1, eps=1e-8)  # (B, T, H)
        if self.gate_kind == "centered":
            g = 2.0 * torch.sigmoid(self.gate_logit + self.gate_beta * cos)
        else:
            g = torch.sigmoid(self.gate_logit + cos)
        return g.unsqueeze(-1)  # (B, T, H, 1)

    def infuse(
        self,
        x: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        gate: torch.Tensor | None,
    ) -> torch.Tensor:
        """Eqs. 2-3 and 5 in the configured form. x (B, T, d_kv); scale, shift (B, d_kv)."""
        b, t, _ = x.shape
        xs = x.to(scale.dtype).view(b, t, self.num_kv_heads, self.head_dim)  # (B, T, H, Dh)
        s = scale.view(b, 1, self.num_kv_heads, self.head_dim)  # (B, 1, H, Dh)
        a = shift.view(b, 1, self.num_kv_heads, self.head_dim)
        if self.form == "paper":
            out = xs * s + a if gate is None else (xs * s + a) * gate
        elif self.form == "residual":
            out = xs + (xs * s + a if gate is None else (xs * s + a) * gate)
        else:  # gated
            delta = xs * (s - 1.0) + a
            out = xs + (delta if gate is None else gate * delta)
        return out.reshape(b, t, self.d_kv).to(x.dtype)

    def infuse_ff(self, hidden: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Eq. 7: H' = H * Id_f. hidden (B, T, d_ff); scale (B, d_ff)."""
        return (hidden.to(scale.dtype) * scale.unsqueeze(1)).to(hidden.dtype)
