r"""Multimodal Infusion Tuning (MiT).

Sun, Song, Yu, Liu, Chen, Lin, "Multimodal Infusion Tuning for Large Models" (2024);
the project's precise form is ../shared/DESIGN.md section 2, which wins where it is more precise.

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

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmtune.methods.base import AdapterModel, deprecated_alias
from mmtune.models.architectures import (
    ArchitectureSpec,
    config_int,
    get_architecture,
    linear_features,
    resolve,
)
from mmtune.utils.adapter_file import (
    base_model_id,
    load_adapter_tensors,
    read_adapter,
    write_adapter,
)

__all__ = ["MiTConfig", "MiTLayer", "MiTModel", "inject_mit", "paper_layers"]

Form = Literal["paper", "residual", "gated"]
Gate = Literal["sigmoid", "centered"]


def paper_layers(num_layers: int) -> list[int]:
    """The paper's layer set scaled to depth N: {N-19, N-15, N-11, N-7, N-3, N} (1-based).

    For N = 32 this is [13, 17, 21, 25, 29, 32]; entries below 1 are dropped on shallow models.
    """
    return sorted({i for i in (*range(num_layers - 19, num_layers - 2, 4), num_layers) if i >= 1})


@dataclass
class MiTConfig:
    """Configuration of Multimodal Infusion Tuning."""

    d_modality: int | None = None
    """Width d_I of the per-sample modality vector I (768 for CLIP ViT-L/14's image_embeds);
    ``None`` lets the training pipeline set it from the modality encoder."""
    layers: list[int] | str = "21,25,29,32/32"
    """Infused layers, 1-based; ``paper`` = {N-19, N-15, ..., N-3, N}; ``all`` = 1..N; or a set
    written for another depth and scaled to this model's, ``"1,9,17,25,32/32"`` (layer l of 32
    becomes round(l * N / 32), at least 1: the paper's Table 5 sets on any depth). The default,
    the paper's Table 5 set {21, 25, 29, 32} of 32 layers, won the project's layer ablation
    (README "Ablations"); it is {20, 23, 27, 30} on SmolLM2's 30 layers."""
    form: Form = "residual"
    """How the infusion combines with the frozen K/V: ``paper`` (eqs. 2-5 literally),
    ``residual`` (the authors' code; the default because it wins the project's accuracy table,
    README "Forms") or ``gated`` (exact identity at init: the frozen model until training moves
    it; choose it where the LLM's own outputs must survive, e.g. generation)."""
    kv_infusion: bool = True
    """Infuse keys and values (eqs. 2-3)."""
    head_rescaling: bool = True
    """Per-head sigmoid gate on the infused K/V (eqs. 4-5); needs ``kv_infusion``."""
    ff_infusion: bool = True
    """Rescale the activated feed-forward hidden (eq. 7)."""
    gate: Gate = "sigmoid"
    """``sigmoid``: sigmoid(L + cos), the paper's gate (0.5 at init); ``centered``:
    2 * sigmoid(L + beta * cos) with L = beta = 0 at init, so exactly 1 at init."""
    check_finite: bool = True
    """Reject modality vectors holding NaN or +-inf (one device sync per call)."""
    map_rank: int | None = None
    """Factorise each layer's maps through rank r: one shared ``A: d_I -> r`` per layer
    (random init, no bias), then ``B_m: r -> width`` per map (weight 0 and bias 1 or 0, as the
    full maps, so still identity at init; P's ``B`` random, no bias). ``None``: the full
    ``d_I -> width`` maps of eq. 1. It cuts a layer's d_I x (5 d_kv + d_ff) weights to
    d_I x r + r x (5 d_kv + d_ff)."""

    def __post_init__(self) -> None:
        if self.d_modality is not None and (
            not isinstance(self.d_modality, int) or isinstance(self.d_modality, bool)
        ):
            raise TypeError(f"MiTConfig.d_modality must be an int, got {self.d_modality!r}")
        if self.d_modality is not None and self.d_modality <= 0:
            raise ValueError(f"MiTConfig.d_modality must be positive, got {self.d_modality}")
        if isinstance(self.layers, str):
            if self.layers not in ("paper", "all"):
                _scaled_layers(self.layers, 1)  # validates the "l1,l2,.../N" form
        else:
            layers = list(self.layers)
            if not layers:
                raise ValueError("MiTConfig.layers is empty: name at least one layer (1-based)")
            bad = [x for x in layers if not isinstance(x, int) or isinstance(x, bool) or x < 1]
            if bad:
                raise ValueError(
                    f"MiTConfig.layers holds {bad}: layers are 1-based integers (first layer = 1)"
                )
            if len(set(layers)) != len(layers):
                raise ValueError(f"MiTConfig.layers has duplicates: {layers}")
            self.layers = sorted(layers)
        if self.form not in ("paper", "residual", "gated"):
            raise ValueError(
                f"MiTConfig.form must be 'paper', 'residual' or 'gated', got {self.form!r}"
            )
        if self.gate not in ("sigmoid", "centered"):
            raise ValueError(f"MiTConfig.gate must be 'sigmoid' or 'centered', got {self.gate!r}")
        if self.head_rescaling and not self.kv_infusion:
            raise ValueError(
                "MiTConfig.head_rescaling rescales the infused keys and values: it needs "
                "kv_infusion=True (set head_rescaling=False for feed-forward-only infusion)"
            )
        if not (self.kv_infusion or self.ff_infusion):
            raise ValueError("MiTConfig: kv_infusion and ff_infusion are both off; nothing to do")
        if self.map_rank is not None and (
            not isinstance(self.map_rank, int) or isinstance(self.map_rank, bool)
            or self.map_rank < 1
        ):  # fmt: skip
            raise ValueError(
                f"MiTConfig.map_rank must be a positive int or None, got {self.map_rank!r}"
            )

    def resolve_layers(self, num_layers: int) -> list[int]:
        """The 1-based infused layers of a model with ``num_layers`` decoder layers."""
        if self.layers == "paper":
            return paper_layers(num_layers)
        if self.layers == "all":
            return list(range(1, num_layers + 1))
        if isinstance(self.layers, str):
            return _scaled_layers(self.layers, num_layers)
        out_of_range = [x for x in self.layers if x > num_layers]
        if out_of_range:
            raise ValueError(
                f"MiTConfig.layers {out_of_range} out of range: this model has {num_layers} "
                f"layers, numbered 1..{num_layers}"
            )
        return list(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scaled_layers(spec: str, num_layers: int) -> list[int]:
    """``"1,9,17,25,32/32"`` -> those layers of a 32-layer model scaled to ``num_layers``."""
    bad = ValueError(
        f"MiTConfig.layers must be a list of 1-based layer numbers, 'paper' or 'all', or "
        f"'l1,l2,.../N' (layers of an N-layer model, scaled to this model's depth); got {spec!r}"
    )
    layers_part, sep, depth_part = spec.partition("/")
    try:
        depth = int(depth_part)
        layers = [int(x) for x in layers_part.split(",")]
    except ValueError:
        raise bad from None
    if not sep or depth < 1 or not layers or any(not 1 <= x <= depth for x in layers):
        raise bad
    return sorted({min(num_layers, max(1, round(x * num_layers / depth))) for x in layers})


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


def _match_batch(t: torch.Tensor, batch: int, where: str) -> torch.Tensor:
    """Repeat per-sample maps for expanded batches (beam search, num_return_sequences)."""
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0] == 0:
        # generate() expands inputs with repeat_interleave, so sample i owns rows i*k .. i*k+k-1
        return t.repeat_interleave(batch // t.shape[0], dim=0)
    raise ValueError(
        f"{where}: the modality batch has {t.shape[0]} rows but the hidden states have "
        f"{batch}; pass one modality vector per sample"
    )


@dataclass
class _Context:
    modality: torch.Tensor
    maps: dict[int, LayerMaps] = field(default_factory=dict)


class MiTModel(AdapterModel):
    """A Hugging Face causal LM with MiT hooked in; call it like the base model plus ``modality``.

    Example::

        mit = inject_mit(model, MiTConfig(d_modality=768))
        out = mit(input_ids=ids, attention_mask=mask, modality=image_embeds)  # (B, 768)
        gen = mit.generate(input_ids=ids, modality=image_embeds, max_new_tokens=20)

    Base weights are frozen and keep their names; the infusion parameters live in
    ``mit.infusion`` (one :class:`MiTLayer` per infused layer, keyed by its 1-based number).
    The adapter API (save_pretrained, from_pretrained, disable_adapter, unload, ...) is the
    one every method shares (:class:`mmtune.methods.base.AdapterModel`).
    """

    adapter_prefix = "infusion."

    def __init__(self, model: nn.Module, config: MiTConfig, *, freeze_base: bool = True):
        super().__init__()
        model_config = getattr(model, "config", None)
        if model_config is None or not hasattr(model_config, "model_type"):
            raise TypeError(
                "MiT needs a Hugging Face PreTrainedModel with a config; got "
                f"{type(model).__name__}"
            )
        if config.d_modality is None:
            raise ValueError(
                "MiTConfig.d_modality is not set: give the width of the modality vector I"
            )
        self.mit_config = config
        self.spec: ArchitectureSpec = get_architecture(model_config.model_type)
        decoder_layers = resolve(model, self.spec.layers)
        self.num_layers = len(decoder_layers)
        self.layer_ids = config.resolve_layers(self.num_layers)

        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        if freeze_base:
            model.requires_grad_(False)
        self.base_model = model

        self.infusion = nn.ModuleDict()
        self._handles: list[Any] = []
        for layer_id in self.layer_ids:
            block = decoder_layers[layer_id - 1]
            self.infusion[str(layer_id)] = self._build_layer(block, model_config)
            self._hook_layer(layer_id, block)

        self._ctx: _Context | None = None
        self._unloaded = False

    # ------------------------------------------------------------------ construction
    def _build_layer(self, block: nn.Module, model_config: Any) -> MiTLayer:
        spec = self.spec
        down = resolve(block, spec.ff_down)
        d_ff, _ = linear_features(down)
        num_kv = config_int(model_config, spec.num_kv_heads)
        if spec.qkv_proj is not None:
            _, total = linear_features(resolve(block, spec.qkv_proj))
            num_q = config_int(model_config, spec.num_heads)
            head_dim, rem = divmod(total, num_q + 2 * num_kv)
            if rem:
                raise ValueError(
                    f"fused {spec.qkv_proj} width {total} is not (q heads {num_q} + 2 x kv heads "
                    f"{num_kv}) x head_dim"
                )
            d_kv = num_kv * head_dim
        else:
            _, d_kv = linear_features(resolve(block, spec.k_proj))
            _, d_v = linear_features(resolve(block, spec.v_proj))
            if d_v != d_kv:
                raise ValueError(f"k_proj width {d_kv} != v_proj width {d_v}")
        ref = next(down.parameters())
        dtype = torch.promote_types(ref.dtype, torch.float32) if ref.is_floating_point() else None
        return MiTLayer(
            self.mit_config,
            d_kv=d_kv,
            num_kv_heads=num_kv,
            d_ff=d_ff,
            device=ref.device,
            dtype=dtype,
        )

    def _hook_layer(self, layer_id: int, block: nn.Module) -> None:
        spec, cfg = self.spec, self.mit_config
        adapter: MiTLayer = self.infusion[str(layer_id)]
        where = f"MiT layer {layer_id}"

        if cfg.kv_infusion and spec.qkv_proj is not None:
            qkv = resolve(block, spec.qkv_proj)
            d_kv = adapter.d_kv

            def qkv_hook(module, args, kwargs, output):
                ctx = self._active(where)
                if ctx is None:
                    return None
                m = self._layer_maps(ctx, layer_id)
                d_q = output.shape[-1] - 2 * d_kv
                q, k, v = output.split([d_q, d_kv, d_kv], dim=-1)  # each (B, T, width)
                b = output.shape[0]
                g = None
                if m.probe is not None:
                    g = adapter.head_gate(v, _match_batch(m.probe, b, where))
                k = adapter.infuse(
                    k, _match_batch(m.k_scale, b, where), _match_batch(m.k_shift, b, where), g
                )
                v = adapter.infuse(
                    v, _match_batch(m.v_scale, b, where), _match_batch(m.v_shift, b, where), g
                )
                return torch.cat([q, k, v], dim=-1)

            self._handles.append(qkv.register_forward_hook(qkv_hook, with_kwargs=True))
        elif cfg.kv_infusion:
            k_proj = resolve(block, spec.k_proj)
            v_proj = resolve(block, spec.v_proj)

            # k_proj runs first, and its gate needs the raw values: the key hook computes them
            # and hands them to v_proj, which then returns them for that very input instead of
            # multiplying again (v_proj runs once; its own hook still infuses the values).
            held: list[tuple[torch.Tensor, torch.Tensor]] = []
            v_forward = v_proj.forward

            def v_once(*args: Any, **kwargs: Any) -> torch.Tensor:
                if held:
                    x, raw_v = held.pop()
                    if len(args) == 1 and not kwargs and args[0] is x:
                        return raw_v
                return v_forward(*args, **kwargs)

            self._handles.append(_Restore(v_proj, "forward"))
            v_proj.forward = v_once

            def kv_hook(which: str):
                """The hook of k_proj (``which="k"``) or v_proj (``"v"``)."""

                def hook(module, args, kwargs, output):
                    ctx = self._active(where)
                    if ctx is None:
                        return None
                    m = self._layer_maps(ctx, layer_id)
                    b = output.shape[0]
                    g = None
                    if m.probe is not None:
                        raw_v = output
                        if which == "k":  # computed here, once (see v_once)
                            raw_v = v_forward(*args, **kwargs)
                            if len(args) == 1 and not kwargs:
                                held[:] = [(args[0], raw_v)]
                        g = adapter.head_gate(raw_v, _match_batch(m.probe, b, where))
                    scale, shift = (
                        (m.k_scale, m.k_shift) if which == "k" else (m.v_scale, m.v_shift)
                    )
                    return adapter.infuse(
                        output, _match_batch(scale, b, where), _match_batch(shift, b, where), g
                    )

                return hook

            k_hook, v_hook = kv_hook("k"), kv_hook("v")

            self._handles.append(k_proj.register_forward_hook(k_hook, with_kwargs=True))
            self._handles.append(v_proj.register_forward_hook(v_hook, with_kwargs=True))

        if cfg.ff_infusion:
            down = resolve(block, spec.ff_down)

            def ff_pre_hook(module, args, kwargs):
                ctx = self._active(where)
                if ctx is None:
                    return None
                m = self._layer_maps(ctx, layer_id)
                hidden = args[0] if args else kwargs["input"]
                scale = _match_batch(m.ff_scale, hidden.shape[0], where)
                hidden = adapter.infuse_ff(hidden, scale)
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "input": hidden}

            self._handles.append(down.register_forward_pre_hook(ff_pre_hook, with_kwargs=True))

    # ------------------------------------------------------------------ modality context
    def _active(self, where: str) -> _Context | None:
        """The context the hooks should use, or None when they must leave outputs alone."""
        if not self.adapter_enabled:
            return None
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError(
                f"{where}: MiT infusion is active but no modality vector is set. Call the "
                "MiTModel with modality=I (B, d_I), use `with mit.using_modality(I):` around "
                "calls of the base model, or `with mit.disable_adapter():` for the frozen model."
            )
        return ctx

    def _layer_maps(self, ctx: _Context, layer_id: int) -> LayerMaps:
        maps = ctx.maps.get(layer_id)
        if maps is None:  # computed once per call, reused by every decoding step
            maps = self.infusion[str(layer_id)].maps(ctx.modality)
            ctx.maps[layer_id] = maps
        return maps

    def _check_modality(self, modality: Any) -> torch.Tensor:
        d = self.mit_config.d_modality
        if not isinstance(modality, torch.Tensor):
            raise TypeError(
                f"modality must be a torch.Tensor of shape (batch, {d}); got "
                f"{type(modality).__name__}"
            )
        if modality.ndim != 2 or modality.shape[-1] != d:
            raise ValueError(
                f"modality must have shape (batch, d_modality={d}); got {tuple(modality.shape)}"
                + (
                    f": its width {modality.shape[-1]} differs from MiTConfig.d_modality {d}"
                    if modality.ndim == 2
                    else ""
                )
            )
        if not modality.is_floating_point():
            raise TypeError(f"modality must be a floating-point tensor, got {modality.dtype}")
        if self.mit_config.check_finite:
            bad = ~torch.isfinite(modality).all(dim=-1)
            if bool(bad.any()):
                rows = bad.nonzero().flatten().tolist()
                raise ValueError(
                    f"modality holds NaN or infinite values in batch rows {rows[:10]}"
                    + (" ..." if len(rows) > 10 else "")
                )
        return modality

    def using_modality(self, modality: torch.Tensor) -> AbstractContextManager[None]:
        """Set the modality vectors (B, d_I) for the calls inside the block; cleared on exit.

        For calls of the base model itself (``mit.base_model(...)``, a pipeline, a trainer)::

            with mit.using_modality(image_embeds):
                out = mit.base_model(input_ids=ids)
        """
        self._check_alive()
        return self._infusing(self._check_modality(modality))

    @contextmanager
    def _infusing(self, modality: torch.Tensor) -> Iterator[None]:
        previous, self._ctx = self._ctx, _Context(modality)
        try:
            yield
        finally:
            self._ctx = previous  # cleared even when the call raises

    def _check_alive(self) -> None:
        if self._unloaded:
            raise RuntimeError("this MiTModel was unloaded; inject MiT again to use it")

    # ------------------------------------------------------------------ calls
    def _batch_size(self, args: tuple, kwargs: dict) -> int | None:
        for x in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
            if isinstance(x, torch.Tensor) and x.ndim >= 2:
                return int(x.shape[0])
        return None

    def forward(self, *args: Any, modality: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The base model's forward with infusion of ``modality`` (B, d_I)."""
        self._check_alive()
        if not self.adapter_enabled:
            return self.base_model(*args, **kwargs)
        if modality is None:
            raise ValueError(
                "MiTModel.forward needs modality=(batch, d_modality) tensor; to run the frozen "
                "model use `with mit.disable_adapter():`"
            )
        modality = self._check_modality(modality)
        batch = self._batch_size(args, kwargs)
        if batch is not None and batch != modality.shape[0]:
            raise ValueError(
                f"modality has {modality.shape[0]} rows but the inputs have batch size {batch}"
            )
        if self.training and _checkpointing(self.base_model):
            raise NotImplementedError(
                "MiT with gradient checkpointing is not supported yet: the recomputation in "
                "backward runs after the modality context is cleared"
            )
        with self._infusing(modality):
            return self.base_model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, modality: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """``base_model.generate`` with infusion; beams and num_return_sequences are handled."""
        self._check_alive()
        if not self.adapter_enabled:
            return self.base_model.generate(*args, **kwargs)
        if modality is None:
            raise ValueError("MiTModel.generate needs modality=(batch, d_modality) tensor")
        with self.using_modality(modality):
            return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ reports and I/O
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``adapter.safetensors`` + ``adapter_config.json`` (atomically) to ``directory``."""
        return write_adapter(
            directory,
            method="mit",
            tensors=self.adapter_state_dict(),
            config=self.mit_config.to_dict(),
            base_model=self.base_model,
        )

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory: str | Path, *, freeze_base: bool = True
    ) -> MiTModel:
        """Inject the saved adapter in ``directory`` into ``model`` (a fresh base model)."""
        meta, tensors = read_adapter(directory, method="mit")
        source = Path(directory) / "adapter_config.json"
        try:
            config = MiTConfig(**meta["config"])
        except TypeError as e:
            raise ValueError(f"{source}: field 'config' does not fit MiTConfig ({e})") from e
        saved_type = meta.get("base_model_type")
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if saved_type is not None and saved_type != model_type:
            raise ValueError(
                f"{source}: adapter was saved on a {saved_type!r} model, this one is {model_type!r}"
            )
        saved_id = meta.get("base_model")
        if saved_id and base_model_id(model) and saved_id != base_model_id(model):
            warnings.warn(
                f"{source}: adapter was saved on base model {saved_id!r}; loading onto "
                f"{base_model_id(model)!r}",
                stacklevel=2,
            )
        mit = cls(model, config, freeze_base=freeze_base)
        load_adapter_tensors(
            mit, tensors, source=str(Path(directory) / "adapter.safetensors"), prefix="infusion."
        )
        return mit

    def unload(self) -> nn.Module:
        """Remove every hook, restore ``requires_grad`` flags and return the original model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for n, p in self.base_model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, p.requires_grad))
        self._unloaded = True
        return self.base_model

    save_adapter = deprecated_alias("save_pretrained", "save_adapter")

    def extra_repr(self) -> str:
        c = self.mit_config
        return (
            f"layers={self.layer_ids}, form={c.form}, kv={c.kv_infusion}, "
            f"head_rescaling={c.head_rescaling}, ff={c.ff_infusion}, d_modality={c.d_modality}"
        )


def _checkpointing(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on: ``is_activation_checkpointing`` in
    transformers >= 5.2x, ``is_gradient_checkpointing`` before (now a deprecated alias)."""
    name = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    return bool(getattr(model, name, False))


class _Restore:
    """Undoes an instance attribute override made after it is built, like a hook handle's
    ``remove()``: the instance's own earlier value comes back, or the class attribute."""

    _MISSING = object()

    def __init__(self, obj: Any, name: str):
        self.obj, self.name = obj, name
        self.before = obj.__dict__.get(name, self._MISSING)

    def remove(self) -> None:
        if self.before is self._MISSING:
            self.obj.__dict__.pop(self.name, None)
        else:
            self.obj.__dict__[self.name] = self.before


def inject_mit(model: nn.Module, config: MiTConfig, *, freeze_base: bool = True) -> MiTModel:
    """Hook MiT into a Hugging Face causal LM; the base weights are frozen and keep their names."""
    return MiTModel(model, config, freeze_base=freeze_base)
