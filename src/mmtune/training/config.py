"""The typed configuration of a training run (YAML, CLI and Python describe the same object).

``mmtune train CONFIG.yaml`` reads a :class:`TrainConfig`; every field has a docstring, shown by
``mmtune train --help``.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmtune.encoders.sequence import SequenceEncoderConfig
from mmtune.heads import SegmentationDecoderConfig
from mmtune.methods.concat import ConcatConfig, PeftAdapterConfig
from mmtune.methods.mit import MiTConfig
from mmtune.methods.registry import PEFT_KINDS, get_method, methods, split_legacy_method
from mmtune.models.llm import QuantizationConfig
from mmtune.tasks.model import TaskConfig

__all__ = [
    "METHOD_NAMES",
    "REPORT_TO",
    "Method",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "check_schedule",
    "load_train_config",
]


@dataclass
class ModelConfig:
    """The frozen models and the trainable encoders' shapes."""

    llm: str = "smollm2-135m"
    """LLM: an embedded name, a directory or a hub id."""
    vision: str = "mobilenet-v2"
    """Vision encoder: a registered name, a directory or a hub id (image tasks)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the frozen LLM (the trainable parts stay fp32)."""
    attn_implementation: str = "sdpa"
    """Attention backend of the LLM: sdpa, eager, flash_attention_2."""
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    """A 4- or 8-bit frozen LLM (bitsandbytes; e.g. ``{bits: 4, type: nf4, compute_dtype:
    bfloat16}``); the trained parts stay fp32. Training needs CUDA (on the CPU bitsandbytes
    drops the gradients after a forward without grad; docs/limits.md); eval and predict run
    anywhere."""
    image_size: int | None = None
    """Input side of a CNN vision encoder (default: its own, 224 for MobileNetV2); ViTs keep
    their fixed size."""
    sequence: SequenceEncoderConfig = field(default_factory=SequenceEncoderConfig)
    """Sentiment: shape of each frame encoder (d_in is set from the data)."""
    decoder: SegmentationDecoderConfig = field(default_factory=SegmentationDecoderConfig)
    """Segmentation: shape of the decoder."""


def check_schedule(
    decay_every: int | None, decay_gamma: float, grad_clip: float, prefix: str = ""
) -> None:
    """The schedule and clipping settings, each refused with its (``prefix``-ed) field name."""
    if decay_every is not None and decay_every < 1:
        raise ValueError(
            f"{prefix}decay_every must be >= 1, or null for no decay; got {decay_every}"
        )
    if not 0 < decay_gamma <= 1:
        raise ValueError(f"{prefix}decay_gamma must be in (0, 1], got {decay_gamma}")
    if grad_clip < 0:
        raise ValueError(f"{prefix}grad_clip must be >= 0 (0: off), got {grad_clip}")


@dataclass
class OptimConfig:
    """Optimiser and schedule (defaults: the paper's sec. 3.3)."""

    lr: float = 4e-5
    """Adam learning rate of the infusion (and sequence encoders)."""
    head_lr_scale: float = 0.1
    """The head's learning rate is lr x this (the paper: decoder lr x 0.1)."""
    epochs: int = 30
    """Passes over the training split (schedule plateau: the most it may run)."""
    schedule: Literal["step", "plateau"] = "step"
    """``step``: the learning rates times decay_gamma every decay_every epochs. ``plateau``:
    times decay_gamma after each epoch whose val headline metric does not beat the best so
    far by more than plateau_threshold; after max_decays decays, the next such epoch ends
    the run (the budget follows the val curve, not a fixed epoch count; decay_every unused)."""
    decay_every: int | None = 10
    """Schedule step: multiply the learning rates by decay_gamma every this many epochs
    (null: no decay)."""
    decay_gamma: float = 0.1
    """Decay factor of either schedule."""
    plateau_threshold: float = 0.005
    """Schedule plateau: the least gain of the val headline metric over its best that counts
    as an improvement (absolute, in the metric's units)."""
    max_decays: int = 2
    """Schedule plateau: decays before the next epoch without improvement ends the run."""
    decay_waits_for_modality: bool = True
    """Before the first decay, an epoch after which the val reliance drop is within noise
    (the model does not read the modality yet: TrainConfig.val_reliance) does not count
    toward ``decay_every``: the learning rate stays up until the modality is read (or the
    epochs run out). Tasks whose head reads the image itself (segmentation) never wait. On
    data where the image is read before the decay the run is the same as without it."""
    batch_size: int = 8
    """Samples per step on each process."""
    eval_batch_size: int = 32
    """Samples per forward in evaluation."""
    grad_clip: float = 1.0
    """Max gradient norm (0: off)."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("OptimConfig: epochs, batch_size and eval_batch_size must be >= 1")
        if self.lr <= 0 or self.head_lr_scale <= 0:
            raise ValueError("OptimConfig: lr and head_lr_scale must be > 0")
        check_schedule(self.decay_every, self.decay_gamma, self.grad_clip, prefix="optim.")
        if self.schedule not in ("step", "plateau"):
            raise ValueError(f"optim.schedule must be step or plateau, got {self.schedule!r}")
        if self.plateau_threshold < 0 or self.max_decays < 0:
            raise ValueError("optim.plateau_threshold and optim.max_decays must be >= 0")


REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")


Method = Literal["mit", "text", "concat"]
"""The registered methods of task models (:func:`mmtune.methods.registry.methods` ``("llm")``)."""


METHOD_NAMES: tuple[str, ...] = ("mit", "text", "concat")


@dataclass
class TrainConfig:
    """One training run."""

    task: TaskConfig = field(default_factory=TaskConfig)
    """Data, prompt and task options."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Frozen models and trainable encoder shapes."""
    method: str = "mit"
    """How the modality reaches the frozen LLM, a registered method (mmtune.methods.registry):
    ``mit`` (infusion); ``text`` (it does not: text-only baseline); ``concat`` (projected tokens
    before the text, projector trained). ``concat_lora`` / ``concat_ia3`` (mmtune < 0.4) load
    as method concat with peft lora / ia3, with a deprecation warning."""
    peft: Literal["none", "lora", "ia3"] | dict[str, Any] = "none"
    """PEFT adapters added to the frozen LLM (method concat): ``none``, ``lora`` or ``ia3``;
    their options are peft_config. (A mapping here is the spelling of mmtune < 0.4 for
    peft_config; it loads with a deprecation warning.)"""
    mit: MiTConfig = field(default_factory=MiTConfig)
    """MiT (d_modality is set from the modality encoder when left empty)."""
    concat: ConcatConfig = field(default_factory=ConcatConfig)
    """Token concatenation (method concat)."""
    peft_config: PeftAdapterConfig = field(default_factory=PeftAdapterConfig)
    """Options of the LoRA / IA3 adapters (peft lora, ia3)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and schedule."""
    output_dir: str = "runs/train"
    """Where checkpoints, results.json, TensorBoard logs and pictures go."""
    seed: int = 0
    """Seed of initialisation, data order and dropout."""
    resume: bool = False
    """Continue the run in output_dir from its newest intact checkpoint; every setting except
    optim.epochs must match the run's."""
    overwrite: bool = False
    """Replace the run already in output_dir (its results, weights and checkpoints are removed)."""
    cache_lower_layers: bool = True
    """Compute the hidden states below the first infused layer once (they do not depend on I)."""
    gradient_checkpointing: bool = False
    """Activation checkpointing of the frozen LLM's layers (Hugging Face's, non-reentrant):
    each layer keeps only its input for backward and recomputes the rest, trading about one
    more forward of the trained layers for activation memory; MiT replays each layer with its
    own modality. Results equal the run without it (to float rounding); it may change on
    resume."""
    feature_cache: bool = True
    """Store frozen-encoder features in $MMTUNE_CACHE and reuse them across runs."""
    keep_checkpoints: int = 2
    """How many epoch checkpoints to keep (the newest intact ones; at least 1)."""
    plots: bool = True
    """Write PNG pictures (curves, masks or scatter)."""
    val_reliance: bool = True
    """Score the val split a second time after every epoch with each sample's modality taken
    from another sample: the reliance curve (``history[].val.reliance_drop`` and its bootstrap
    error ``reliance_drop_se``), and a warning when the drop is still within noise at the
    epoch after which the learning rate first decays (the run may settle on the text-only
    solution). False: one val pass per epoch, no curve."""
    report_to: Literal["tensorboard", "wandb", "mlflow", "none"] = "tensorboard"
    """Where the training loss and the val metrics are logged, through accelerate's trackers:
    ``tensorboard`` (``output_dir/tensorboard``), ``wandb`` or ``mlflow`` (their packages
    installed and set up by you), or ``none``."""

    def __post_init__(self) -> None:
        if self.report_to not in REPORT_TO:
            raise ValueError(
                f"TrainConfig.report_to must be one of {', '.join(REPORT_TO)}; got "
                f"{self.report_to!r}"
            )
        if isinstance(self.peft, dict):  # mmtune < 0.4: `peft:` held the adapters' options
            warnings.warn(
                "TrainConfig.peft: a mapping of adapter options is deprecated (removed in "
                "mmtune 0.5); write them under peft_config, and peft: lora / ia3 / none",
                DeprecationWarning,
                stacklevel=3,
            )
            self.peft_config, self.peft = PeftAdapterConfig(**self.peft), "none"
        self.method, self.peft = split_legacy_method(self.method, self.peft, "TrainConfig.method")
        try:
            spec = get_method(self.method)
        except KeyError:
            spec = None
        if spec is None or spec.model != "llm":
            raise ValueError(
                f"TrainConfig.method must be one of {', '.join(methods('llm'))}; got "
                f"{self.method!r}"
            )
        if self.peft not in PEFT_KINDS:
            raise ValueError(
                f"TrainConfig.peft must be one of {', '.join(PEFT_KINDS)}; got {self.peft!r}"
            )
        if self.peft != "none" and not spec.takes_peft:
            raise ValueError(
                f"TrainConfig.peft: {self.peft} adapters go with method concat, not {self.method}"
            )
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite: choose one")


def load_train_config(path: str | Path) -> TrainConfig:
    """The TrainConfig a YAML file describes, exactly as ``mmtune train PATH`` reads it.

    The file's keys are TrainConfig's fields (``task:``, ``optim:`` ...); jsonargparse checks
    every key and type, so a misspelt field is a one-line error naming it. Nothing in the file
    is executed (yaml safe loading)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TrainConfig)
    try:
        ns = parser.parse_path(str(path))
    except argparse.ArgumentError as e:
        raise ValueError(f"{path}: {e}") from None
    init = parser.instantiate(ns)
    return TrainConfig(**{k: v for k, v in vars(init).items() if k != "__path__"})
