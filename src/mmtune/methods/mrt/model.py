"""MRTModel: MRT's edits hooked into mmtune's LLaVA-style model (the formulas, positions and
initialisation are in :mod:`mmtune.methods.mrt`), with the shared adapter API."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtune.methods.base import AdapterModel, deprecated_alias
from mmtune.methods.mrt.config import MRTConfig, MRTControl, _llm_layer_indices
from mmtune.methods.mrt.layer import LoReFTEdit
from mmtune.models.architectures import get_architecture, resolve
from mmtune.models.lmm import LlavaStyleModel, LMMBatch, LMMConfig, load_lmm
from mmtune.utils.adapter_file import (
    load_adapter_tensors,
    read_adapter,
    write_adapter,
)


class MRTModel(AdapterModel):
    """A :class:`LlavaStyleModel` with MRT edits; only the edits train."""

    adapter_prefix = "edits."

    def __init__(self, base: LlavaStyleModel, config: MRTConfig | None = None):
        super().__init__()
        self.base_model = base
        self.mrt_config = config = config or MRTConfig()
        base.requires_grad_(False)
        tower = base.tower
        p = next(base.llm.parameters())
        edits: dict[str, LoReFTEdit] = {}
        n_blocks = len(tower.blocks)
        self._vision: dict[str, int] = {}
        for i in config.vision_layers:
            k = i + n_blocks if i < 0 else i
            if not 0 <= k < n_blocks:
                raise ValueError(
                    f"MRTConfig.vision_layers: {i} is outside the encoder's {n_blocks} blocks"
                )
            if tower.block_tokens[k] != tower.num_tokens:
                raise ValueError(
                    f"MRTConfig.vision_layers: block {k} has {tower.block_tokens[k]} positions, "
                    f"not the {tower.num_tokens} visual tokens; edits sit on the visual-token grid"
                )
            self._vision[f"vision.{k}"] = k
            edits[f"vision.{k}"] = LoReFTEdit(
                tower.block_widths[k], config.vision_rank, config.init
            )
        d_model = base.llm.get_input_embeddings().embedding_dim
        if config.projector_edit:
            edits["projector"] = LoReFTEdit(d_model, config.projector_rank, config.init)
        arch = get_architecture(base.llm.config.model_type)
        decoder_layers = resolve(base.llm, arch.layers)
        self._llm = {f"llm.{j}": j for j in _llm_layer_indices(config, len(decoder_layers))}
        for name in self._llm:
            edits[name] = LoReFTEdit(d_model, config.llm_rank, config.init)
        # ModuleDict keys cannot hold dots
        self.edits = nn.ModuleDict({k.replace(".", "_"): v for k, v in edits.items()})
        self.edits.to(device=p.device, dtype=p.dtype)
        self.control = MRTControl()
        self._positions: torch.Tensor | None = None  # (B, T) LLM edit mask while active
        self._visual: torch.Tensor | None = None  # (N,) visual-token mask
        self._hooks = []
        for name, k in self._vision.items():
            self._hooks.append(tower.blocks[k].register_forward_hook(self._vision_hook(name)))
        if config.projector_edit:
            self._hooks.append(base.projector.register_forward_hook(self._projector_hook()))
        for name, j in self._llm.items():
            self._hooks.append(decoder_layers[j].register_forward_hook(self._llm_hook(name)))

    # -- bookkeeping -----------------------------------------------------------------------
    @property
    def edit_names(self) -> list[str]:
        return [
            *self._vision,
            *(["projector"] if self.mrt_config.projector_edit else []),
            *self._llm,
        ]

    def edit(self, name: str) -> LoReFTEdit:
        return self.edits[name.replace(".", "_")]

    def _scale(self, name: str) -> float:
        if not self.adapter_enabled:  # inside disable_adapter(): the base model alone
            return 0.0
        return float(self.control.scale) * float(self.control.edit_scales.get(name, 1.0))

    def set_control(self, control: MRTControl | None) -> None:
        control = control or MRTControl()
        unknown = sorted(set(control.edit_scales) - set(self.edit_names))
        if unknown:
            raise ValueError(
                f"MRTControl.edit_scales: {unknown} are not edits of this model; its edits are "
                f"{self.edit_names}"
            )
        self.control = control

    def train(self, mode: bool = True) -> MRTModel:
        super().train(mode)
        self.base_model.train(mode)
        return self

    # -- hooks -----------------------------------------------------------------------------
    def _token_scale(self, h: torch.Tensor, name: str) -> torch.Tensor | float:
        s = self._scale(name)
        if self._visual is None:
            return s
        return s * self._visual.to(h.dtype)[:, None]  # (N, 1)

    def _vision_hook(self, name: str):
        def hook(_m, _inp, out):
            s = self._scale(name)
            if s == 0.0:
                return out
            edit = self.edit(name)
            return self.base_model.tower.edit_block_output(
                out, lambda h: edit(h, self._token_scale(h, name))
            )

        return hook

    def _projector_hook(self):
        def hook(_m, _inp, out):  # (n_images, N, d)
            if self._scale("projector") == 0.0:
                return out
            return self.edit("projector")(out, self._token_scale(out, "projector"))

        return hook

    def _llm_hook(self, name: str):
        def hook(_m, _inp, out):
            positions, s = self._positions, self._scale(name)
            if positions is None or s == 0.0:
                return out
            h = out[0] if isinstance(out, tuple) else out  # (B, T, d)
            if positions.shape != h.shape[:2]:
                raise RuntimeError(
                    f"{name}: edit positions {tuple(positions.shape)} do not match the layer "
                    f"output {tuple(h.shape[:2])}"
                )
            scale = (s * positions.to(h.dtype))[..., None]  # (B, T, 1); 0 off the positions
            edited = h + scale * self.edit(name).delta(h)
            return (edited, *out[1:]) if isinstance(out, tuple) else edited

        return hook

    # -- positions -------------------------------------------------------------------------
    def prompt_positions(self, batch: LMMBatch) -> torch.Tensor:
        """(B, T) bool: the edited prompt positions of each sample, from its real span."""
        c = self.control
        b, t = batch.input_ids.shape
        out = torch.zeros(b, t, dtype=torch.bool)
        for i in range(b):
            start, end = int(batch.prompt_start[i]), int(batch.prompt_end[i])
            length = end - start
            if c.positions is not None:
                rel = [p + length if p < 0 else p for p in c.positions]
                bad = [p for p, r in zip(c.positions, rel, strict=True) if not 0 <= r < length]
                if bad:
                    raise ValueError(
                        f"MRTControl.positions {bad} fall outside sample {i}'s prompt of "
                        f"{length} tokens"
                    )
                idx = rel
            else:
                p = self.mrt_config.first if c.first is None else c.first
                s = self.mrt_config.last if c.last is None else c.last
                idx = [*range(min(p, length)), *range(max(0, length - s), length)]
            out[i, [start + r for r in idx]] = True
        return out.to(batch.input_ids.device)

    @contextmanager
    def edits_at(self, batch: LMMBatch) -> Iterator[None]:
        """Edits active for this batch: LLM edits at its prompt positions."""
        n = self.base_model.tower.num_tokens
        if self.control.visual_tokens is not None:
            bad = [v for v in self.control.visual_tokens if not 0 <= v < n]
            if bad:
                raise ValueError(f"MRTControl.visual_tokens {bad} outside 0..{n - 1}")
            mask = torch.zeros(n, dtype=torch.bool, device=batch.input_ids.device)
            mask[self.control.visual_tokens] = True
            self._visual = mask
        self._positions = self.prompt_positions(batch)
        try:
            yield
        finally:
            self._positions = None
            self._visual = None

    # -- the model's API -------------------------------------------------------------------
    def forward(self, batch: LMMBatch) -> torch.Tensor:
        with self.edits_at(batch):
            return self.base_model(batch)

    def loss(self, batch: LMMBatch) -> torch.Tensor:
        with self.edits_at(batch):
            return self.base_model.loss(batch)

    def generate(self, batch: LMMBatch, max_new_tokens: int = 8):
        """Greedy generation; the edits act on the prompt during prefill (and on visual tokens)."""
        with self.edits_at(batch):  # the vision/projector edits run inside embed()
            return self.base_model.generate(
                batch, max_new_tokens, prefill_context=lambda: _prompt_only(self)
            )

    def unload(self) -> LlavaStyleModel:
        """Detach the hooks and return the unmodified base model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return self.base_model

    # -- files -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, base_dir: str | Path | None = None) -> Path:
        """``adapter.safetensors`` + ``adapter_config.json`` (MRTConfig, the base's LMMConfig and
        the stage-1 directory whose projector the edits were trained on, with its hash)."""
        config: dict[str, Any] = {
            "mrt": asdict(self.mrt_config),
            "lmm": asdict(self.base_model.config),
            "base_dir": None,
            "base_projector_sha256": projector_digest(self.base_model),
        }
        if base_dir is not None:
            config["base_dir"] = str(Path(base_dir).resolve())
        return write_adapter(
            directory,
            method="mrt",
            tensors=self.adapter_state_dict(),
            config=config,
            base_model=self.base_model.llm,
        )

    def load_adapter(self, directory: str | Path) -> None:
        """Copy the edits saved in ``directory`` into this model (same MRTConfig)."""
        _, tensors = read_adapter(directory, method="mrt")
        load_adapter_tensors(self, tensors, source=str(directory), prefix="edits.")

    @classmethod
    def from_pretrained(cls, model: LlavaStyleModel, directory: str | Path) -> MRTModel:
        """The edits saved in ``directory`` on ``model`` (its projector must be the one they
        were trained on); :func:`load_mrt` also finds the stage-1 base itself."""
        return load_mrt(directory, base=model)

    @property
    def base(self) -> LlavaStyleModel:
        """Deprecated alias of ``base_model`` (removed in mmtune 0.5)."""
        warnings.warn(
            "MRTModel.base is deprecated (removed in mmtune 0.5); use base_model",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.base_model

    parameter_count = deprecated_alias("trainable_parameters", "parameter_count")
    adapter_tensors = deprecated_alias("adapter_state_dict", "adapter_tensors")
    save_adapter = deprecated_alias("save_pretrained", "save_adapter")
    remove = deprecated_alias("unload", "remove")


@contextmanager
def _prompt_only(model: MRTModel) -> Iterator[None]:
    """Around the prefill (positions set by ``edits_at``); the decode steps that follow are not
    prompt positions, so the LLM edits switch off when it exits."""
    try:
        yield
    finally:
        model._positions = None  # decode steps (T = 1) are not prompt positions


def projector_digest(base: LlavaStyleModel) -> str:
    h = hashlib.sha256()
    for k, v in sorted(base.projector.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_mrt(
    directory: str | Path, base: LlavaStyleModel | None = None, **llm_kwargs: Any
) -> MRTModel:
    """An MRT model from its adapter directory alone (or onto an already loaded ``base``).

    Without ``base``, the stage-1 directory recorded in the adapter is loaded; the projector's
    hash must match the one the edits were trained on.
    """
    directory = Path(directory)
    meta, _ = read_adapter(directory, method="mrt")
    cfg = meta["config"]
    where = directory / "adapter_config.json"
    try:
        mrt_config = MRTConfig(**cfg["mrt"])
        LMMConfig(**cfg["lmm"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: field 'config' lacks a valid 'mrt' or 'lmm' entry ({e})") from e
    if base is None:
        if not cfg.get("base_dir"):
            raise ValueError(f"{where}: no 'base_dir' recorded; pass the base model explicitly")
        base = load_lmm(cfg["base_dir"], **llm_kwargs)
    digest = cfg.get("base_projector_sha256")
    if digest and digest != projector_digest(base):
        raise ValueError(
            f"{where}: the edits were trained on a projector with hash {digest}, but the base "
            f"model's projector hashes to {projector_digest(base)}"
        )
    model = MRTModel(base, mrt_config)
    model.load_adapter(directory)
    return model.eval()
