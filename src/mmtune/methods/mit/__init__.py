r"""Multimodal Infusion Tuning (MiT).

Sun, Song, Yu, Liu, Chen, Lin, "Multimodal Infusion Tuning for Large Models" (2024);
the project's precise form is docs/design.md section 2, which wins where it is more precise.

A frozen decoder-only LLM receives one global modality vector ``I`` (B, d_I) per sample. In each
infused layer ``l`` (1-based) small maps of ``I`` rescale and shift the keys and values and rescale
the activated feed-forward hidden; no token is added, so the cost stays linear in the text length.

Maps (eq. 1), one set per infused layer::

    Id_k, Ia_k, Id_v, Ia_v = Linear(d_I -> d_kv)(I)       # d_kv = kv heads x head dim
    Id_f                   = Linear(d_I -> d_ff)(I)
    multiplicative maps start as W = 0, b = 1; additive maps as W = 0, b = 0

Head rescaling (eqs. 4-5), per token t and kv head h, on the *raw* values ``V = v_proj(x)``::

    g[t, h] = sigmoid(L_h + cos(V_t^h, P(I)^h))                  gate="sigmoid" (the paper)
    g[t, h] = 2 * sigmoid(L_h + beta_h * cos(V_t^h, P(I)^h))     gate="centered" (1 at init)

with ``L`` (and ``beta``) one learned scalar per kv head, init 0, and ``P`` a learned, randomly
initialised projection d_I -> d_kv. Without head rescaling ``g = 1``.

K/V infusion (eqs. 2-3, 5) on the k_proj / v_proj outputs, before rotary embedding, by ``form``::

    paper     K^r = (K * Id_k + Ia_k) * g
    residual  K^r = K + (K * Id_k + Ia_k) * g            (the authors' released code)
    gated     K^r = K + g * (K * (Id_k - 1) + Ia_k)      (exactly K at init, whatever g)

and the same for V. Feed-forward infusion (eq. 7), in every form, on the input of down_proj::

    H' = H * Id_f

The infusion runs in forward hooks on k_proj and v_proj (or a fused qkv projection) and a forward
pre-hook on down_proj, so base weights keep their names, every attention backend works and the KV
cache stores infused keys and values. The key hook needs the raw values for the gate, and k_proj
runs first: it computes ``v_proj(x)`` and hands the result to v_proj, which returns it for that
same input instead of multiplying again, so each projection still runs once.
"""

from mmtune.methods.mit.config import MiTConfig, paper_layers
from mmtune.methods.mit.layer import LayerMaps, MiTLayer
from mmtune.methods.mit.model import MiTModel, inject_mit

__all__ = [
    "LayerMaps",
    "MiTConfig",
    "MiTLayer",
    "MiTModel",
    "inject_mit",
    "paper_layers",
]
