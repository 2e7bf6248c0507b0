"""MiT's configuration: where (layers), how (form, gate) and what (K/V, FF, head rescaling)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

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
