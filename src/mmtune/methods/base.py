"""The adapter API every method wrapper shares (MiT, MRT on mmtune's LLaVA-style model, MRT on a
transformers VLM), with PEFT's names.

=============================  ==========================================================
``base_model``                  the wrapped, frozen model (``get_base_model()`` too)
``trainable_parameters()``      :class:`ParameterCount` (``get_nb_trainable_parameters()``:
                                PEFT's ``(trainable, total)`` pair)
``adapter_state_dict()``        the method's own tensors, keyed as in ``state_dict()``
``save_pretrained(dir)``        ``adapter.safetensors`` + ``adapter_config.json``
``from_pretrained(base, dir)``  the saved adapter on a freshly loaded base model
``disable_adapter()``           a context in which the base model runs unchanged
``unload()``                    hooks removed; the base model, as it was, comes back
=============================  ==========================================================

Names of mmtune < 0.4 (MiT's ``save_adapter``; MRT's ``base``, ``parameter_count``,
``adapter_tensors``, ``save_adapter``, ``remove``) remain for one release as aliases that warn.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mmtune.utils.adapter_file import ParameterCount, count_parameters

__all__ = ["AdapterModel", "deprecated_alias"]


class AdapterModel(nn.Module):
    """Base of the method wrappers. Subclasses set :attr:`adapter_prefix` and
    ``self.base_model``, implement :meth:`save_pretrained`, :meth:`from_pretrained` and
    :meth:`unload`, and have their hooks pass outputs through while :attr:`adapter_enabled`
    is False."""

    adapter_prefix: ClassVar[str]
    """The ``state_dict`` prefix of the method's own tensors (``infusion.``, ``edits.``)."""
    adapter_enabled: bool = True
    """False inside :meth:`disable_adapter`: the hooks change nothing."""

    def get_base_model(self) -> nn.Module:
        """The wrapped model (PEFT's name)."""
        return self.base_model

    def trainable_parameters(self) -> ParameterCount:
        """Trainable and total parameters of the base model plus the adapter."""
        return count_parameters(self)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)``, as PEFT's method of that name returns them."""
        count = self.trainable_parameters()
        return count.trainable, count.total

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The method's own tensors, keyed as in ``self.state_dict()``."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(self.adapter_prefix)}

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the frozen base model: the hooks pass outputs through unchanged inside."""
        previous, self.adapter_enabled = self.adapter_enabled, False
        try:
            yield
        finally:
            self.adapter_enabled = previous

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> Path:
        """Write the adapter to ``directory``; returns it."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path, **kwargs: Any) -> Any:
        """The adapter saved in ``directory`` on ``model`` (a freshly loaded base model)."""
        raise NotImplementedError

    def unload(self) -> nn.Module:
        """Remove the hooks and return the base model unchanged."""
        raise NotImplementedError


def deprecated_alias(new: str, old: str) -> Callable[..., Any]:
    """A method ``old`` that warns (DeprecationWarning, removed in mmtune 0.5) and calls
    ``new``."""

    def alias(self: Any, *args: Any, **kwargs: Any) -> Any:
        warnings.warn(
            f"{type(self).__name__}.{old} is deprecated (removed in mmtune 0.5); use {new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(self, new)(*args, **kwargs)

    alias.__name__ = old
    alias.__doc__ = f"Deprecated alias of :meth:`{new}` (removed in mmtune 0.5)."
    return alias
