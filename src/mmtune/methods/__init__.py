"""Tuning methods: the Method registry (:mod:`mmtune.methods.registry`), the adapter API they
share (:mod:`mmtune.methods.base`), MiT, MRT (``mrt/``), token concatenation and PEFT."""

from mmtune.methods.base import AdapterModel
from mmtune.methods.registry import (
    PEFT_KINDS,
    MethodSpec,
    get_method,
    methods,
    register_method,
)

__all__ = ["PEFT_KINDS", "AdapterModel", "MethodSpec", "get_method", "methods", "register_method"]
