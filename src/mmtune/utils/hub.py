"""What every ``from_pretrained`` of mmtune passes to transformers."""

from __future__ import annotations

from typing import Any

__all__ = ["NO_HUB_KERNELS"]

NO_HUB_KERNELS: dict[str, Any] = {"use_kernels": False}
"""What every ``from_pretrained`` here passes. transformers 5.25 kernelizes a loaded model with
Hub kernels by default; a kernel that fuses a block (an MLP, a norm and a projection) can skip a
submodule MiT hooks (k_proj, v_proj, down_proj) or that MRT's edit positions assume, and it is
fetched from the Hub, which mmtune never reaches at run time. ``load_llm(..., use_kernels=True)``
opts in for a frozen model without hooks."""
