"""The MiT wrapper of a Hugging Face causal LM: hooks, the per-call modality context, the
adapter API (save_pretrained / from_pretrained / disable_adapter / unload)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtune.methods.base import AdapterModel, deprecated_alias
from mmtune.methods.mit.config import MiTConfig
from mmtune.methods.mit.layer import LayerMaps, MiTLayer
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
        # Modules Hugging Face may checkpoint (their _gradient_checkpointing_func is wrapped
        # to carry the modality context into the recomputation: _carry_into_checkpoints).
        self._checkpointable = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]

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
        self._carry_into_checkpoints()
        previous, self._ctx = self._ctx, _Context(modality)
        try:
            yield
        finally:
            self._ctx = previous  # cleared even when the call raises

    def _carry_into_checkpoints(self) -> None:
        """Make activation checkpointing replay a layer with the modality it ran with.

        Hugging Face checkpoints a layer by ``layer._gradient_checkpointing_func(forward,
        *args)`` (``gradient_checkpointing_enable``, reentrant or not); the recomputation runs
        in backward, after the context of the call is gone. Each such function gets wrapped
        (once; checked at every call, since the user may enable checkpointing after injecting):
        the wrapper notes the context at the forward and the replay runs under a copy of it
        whose per-layer maps are computed again, so the recomputation repeats the forward's
        operations exactly (non-reentrant checkpointing checks that) and the maps' gradients
        reach the infusion parameters (reentrant checkpointing runs the forward without grad).
        """
        for module in self._checkpointable:
            func = module.__dict__.get("_gradient_checkpointing_func")
            if func is None or getattr(func, "_mmtune_mit", None) is self:
                continue
            self._handles.append(_Restore(module, "_gradient_checkpointing_func"))
            module._gradient_checkpointing_func = self._replaying_context(func)

    def _replaying_context(self, func: Callable[..., Any]) -> Callable[..., Any]:
        reentrant = bool(getattr(func, "keywords", {}).get("use_reentrant", False))

        def checkpointed(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            noted = self._ctx
            if reentrant and noted is not None and noted.modality.grad_fn is not None:
                raise ValueError(
                    "MiT with reentrant activation checkpointing cannot backpropagate into the "
                    "encoder that computed the modality (it is replayed outside I's graph): "
                    "enable it with use_reentrant=False (the Hugging Face default), e.g. "
                    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                    '{"use_reentrant": False})'
                )
            calls = [0]

            def replay(*a: Any, **k: Any) -> Any:
                calls[0] += 1
                if noted is None or calls[0] == 1:  # the forward itself: its own context
                    return function(*a, **k)
                previous, self._ctx = self._ctx, _Context(noted.modality)
                try:
                    return function(*a, **k)
                finally:
                    self._ctx = previous

            return func(replay, *args, **kwargs)

        checkpointed._mmtune_mit = self  # type: ignore[attr-defined]
        return checkpointed

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
