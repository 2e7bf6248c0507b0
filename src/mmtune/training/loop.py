"""The one training loop of mmtune, on Hugging Face accelerate: ``mmtune train``, stage 1 and
``lmm tune`` all run :func:`fit`.

What it does, per epoch ``e`` (1-based):

1. the order: a permutation of the training samples seeded by ``(seed, e)``
   (:func:`epoch_order`); global step ``s`` takes ``order[s*B*W : (s+1)*B*W]`` and rank ``r``
   its slice ``[r*B : (r+1)*B]`` (B samples per process, W processes), so the data order never
   depends on the number of processes' restarts; ``len // (B*W)`` steps, the rest is dropped;
2. each step: forward (the model returns the loss, or a dict holding it under ``"loss"``),
   ``zero_grad``, backward, clipping of the global gradient norm (``grad_clip``; 0: off),
   optimiser step (Adam or AdamW over the given parameter groups);
3. the ``validate`` hook scores the epoch, the schedule steps once (constant; step decay
   by ``decay_gamma`` every ``decay_every`` counted epochs, :class:`StepDecay`; or decay on
   the val score's plateau with early stop, :class:`PlateauDecay`; ``hold_decay`` may keep an
   epoch from counting before the first decay), the trackers log, and with ``out`` a
   checkpoint is saved atomically (:func:`mmtune.training.checkpoint.save_checkpoint`). A
   plateau schedule that has decayed ``max_decays`` times ends the run at the next epoch
   without improvement (``epochs`` is then the most it may run).

With ``resume`` the newest intact checkpoint under ``out`` is loaded first (weights, optimiser,
schedule, every rank's RNG) and the loop continues after its epoch: bit for bit the run that was
not interrupted, on CPU.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from mmtune.training import checkpoint as ckpt
from mmtune.training.config import check_schedule
from mmtune.utils.progress import Progress, report

__all__ = [
    "FitResult",
    "FitSettings",
    "PlateauDecay",
    "StepDecay",
    "epoch_order",
    "fit",
    "flat_config",
]


@dataclass(frozen=True)
class FitSettings:
    """How :func:`fit` optimises (every recipe maps its own config onto this)."""

    epochs: int
    """Passes over the training samples."""
    batch_size: int
    """Samples per step on each process."""
    seed: int = 0
    """Seed of the data order (initialisation is the caller's)."""
    optimizer: Literal["adam", "adamw"] = "adam"
    """``adam`` (torch.optim.Adam) or ``adamw`` (AdamW, with ``weight_decay``)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    decay_every: int | None = None
    """Multiply every learning rate by ``decay_gamma`` every this many epochs (None: constant)."""
    decay_gamma: float = 0.1
    """Decay factor (either schedule)."""
    schedule: Literal["step", "plateau"] = "step"
    """``step`` (:class:`StepDecay`, every ``decay_every`` epochs) or ``plateau``
    (:class:`PlateauDecay` on ``fit``'s ``score``: decay after an epoch without improvement,
    stop after ``max_decays``)."""
    plateau_threshold: float = 0.005
    """Plateau: an epoch improves when its score exceeds the best so far by more than this."""
    max_decays: int = 2
    """Plateau: decays before the next epoch without improvement ends the run."""
    grad_clip: float = 0.0
    """Max global gradient norm (0: no clipping)."""
    keep_checkpoints: int = 2
    """Epoch checkpoints kept under ``out/checkpoints`` (the newest intact ones)."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("FitSettings: epochs and batch_size must be >= 1")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"FitSettings.optimizer must be adam or adamw, got {self.optimizer!r}")
        check_schedule(self.decay_every, self.decay_gamma, self.grad_clip)
        if self.schedule not in ("step", "plateau"):
            raise ValueError(f"FitSettings.schedule must be step or plateau, got {self.schedule!r}")
        if self.plateau_threshold < 0 or self.max_decays < 0:
            raise ValueError("FitSettings: plateau_threshold and max_decays must be >= 0")


@dataclass
class FitResult:
    """What :func:`fit` leaves: the prepared model (for evaluation), history and timing."""

    model: nn.Module
    """The model as accelerate prepared it (DDP-wrapped on several processes)."""
    history: dict[str, Any]
    """``{"step_loss": [...], "epochs": [{"epoch", "train_loss", "val", "seconds"}, ...]}``."""
    first_epoch: int
    """The epoch this process started at (1, or the one after a resumed checkpoint)."""
    train_seconds: float
    """Seconds in training steps (this process, without validation)."""
    steps_per_epoch: int
    """Optimiser steps per epoch."""


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """The training order of an epoch: a permutation seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config as one level of scalar values (what every tracker's hparams accept)."""
    flat: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            flat.update(flat_config(v, f"{prefix}{k}."))
        elif isinstance(v, bool | int | float | str):
            flat[f"{prefix}{k}"] = v
        else:
            flat[f"{prefix}{k}"] = json.dumps(v, default=str)
    return flat


class StepDecay:
    """Step decay: every learning rate times ``gamma`` after each ``every`` counted epochs
    (``every`` None: constant). An epoch passed to :meth:`step` with ``hold`` does not count
    (``hold`` is honoured only before the first decay: the decay waits, it is never undone).
    Without holds it is ``torch.optim.lr_scheduler.StepLR`` (the same multiplications)."""

    def __init__(self, optimizer: torch.optim.Optimizer, every: int | None, gamma: float):
        self.optimizer, self.every, self.gamma = optimizer, every, gamma
        self.counted, self.decays, self.held = 0, 0, []

    def step(self, epoch: int, hold: bool = False) -> None:
        if hold and self.decays == 0:
            self.held.append(epoch)
            return
        self.counted += 1
        if self.every is not None and self.counted % self.every == 0:
            self.decays += 1
            for group in self.optimizer.param_groups:
                group["lr"] *= self.gamma

    def state_dict(self) -> dict[str, Any]:
        return {"counted": self.counted, "decays": self.decays, "held": list(self.held)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "counted" not in state:  # a checkpoint of mmtune <= 0.4 (StepLR / LambdaLR)
            self.counted = int(state["last_epoch"])
            self.decays = self.counted // self.every if self.every else 0
            self.held = []
            return
        self.counted, self.decays = int(state["counted"]), int(state["decays"])
        self.held = [int(e) for e in state["held"]]


class PlateauDecay:
    """Decay on plateau with early stop. After each epoch with val score ``v`` (higher is
    better): if ``v > best + threshold`` the epoch improves (``best = v``); otherwise every
    learning rate is multiplied by ``gamma`` (one decay), or, once ``max_decays`` decays are
    done, the run stops. The decay rule is ``torch.optim.lr_scheduler.ReduceLROnPlateau``
    with ``mode="max"``, ``patience=0``, ``threshold_mode="abs"`` (a test holds them equal);
    the stop is early stopping with patience 1 after the last decay. An epoch passed with
    ``hold`` (before the first decay) neither decays nor sets ``best``: the decay waits."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, gamma: float, threshold: float, max_decays: int
    ):
        self.optimizer, self.gamma = optimizer, gamma
        self.threshold, self.max_decays = threshold, max_decays
        self.best: float | None = None
        self.decays, self.held, self.stopped = 0, [], False

    def step(self, epoch: int, score: float, hold: bool = False) -> None:
        if hold and self.decays == 0:
            self.held.append(epoch)
            return
        if self.best is None or score > self.best + self.threshold:
            self.best = score
            return
        if self.decays >= self.max_decays:
            self.stopped = True
            return
        self.decays += 1
        for group in self.optimizer.param_groups:
            group["lr"] *= self.gamma

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "decays": self.decays,
            "held": list(self.held),
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = None if state["best"] is None else float(state["best"])
        self.decays, self.stopped = int(state["decays"]), bool(state["stopped"])
        self.held = [int(e) for e in state["held"]]


def _loss(output: Any) -> torch.Tensor:
    return output["loss"] if isinstance(output, dict) else output


def fit(
    model: nn.Module,
    *,
    accelerator: Any,
    num_samples: int,
    make_batch: Callable[[list[int]], Any],
    param_groups: list[dict[str, Any]],
    settings: FitSettings,
    out: Path | None = None,
    config: dict[str, Any] | None = None,
    resume: bool = False,
    validate: Callable[[nn.Module, int], dict[str, float]] | None = None,
    on_resumed: Callable[[], None] | None = None,
    hold_decay: Callable[[dict[str, float]], bool] | None = None,
    score: Callable[[dict[str, float]], float] | None = None,
    progress: Progress | None = None,
    stage: str = "epoch",
    log: bool = False,
) -> FitResult:
    """Train ``model`` (``model(batch)`` returns the loss, or a dict with ``"loss"``).

    ``make_batch(indices)`` builds the batch of those training samples, on the accelerator's
    device. ``param_groups`` are the optimiser's groups (``{"params": [...], "lr": ...}``).
    ``out``: checkpoints go to ``out/checkpoints`` (None: no checkpoints, no resume);
    ``config`` is saved in them. ``validate(prepared_model, epoch)`` returns the epoch's val
    metrics. ``on_resumed`` runs after a checkpoint is loaded (e.g. to refill a cache).
    ``hold_decay(val)``, asked after each epoch but the last, True: that epoch does not count
    toward the decay (honoured before the first decay only). ``score(val)``: the epoch's val
    score, higher is better, which the plateau schedule reads (required for it).
    ``progress`` hears ``"{stage} e/E"`` once per step with the loss and samples/s; ``log``:
    the loss and val metrics go to accelerate's trackers (started by the caller).
    """
    params = [p for g in param_groups for p in g["params"]]
    if not any(p.requires_grad for p in params):
        raise ValueError("nothing to train: no parameter requires grad")
    world, b = accelerator.num_processes, settings.batch_size
    steps = num_samples // (b * world)
    if steps == 0:
        raise ValueError(
            f"{num_samples} training samples cannot fill one global batch of "
            f"{b} x {world} processes"
        )
    module = model
    if settings.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(param_groups)
    else:
        optimizer = torch.optim.AdamW(param_groups, weight_decay=settings.weight_decay)
    scheduler: StepDecay | PlateauDecay
    if settings.schedule == "plateau":
        if score is None or validate is None:
            raise ValueError("the plateau schedule needs validate and score")
        scheduler = PlateauDecay(
            optimizer, settings.decay_gamma, settings.plateau_threshold, settings.max_decays
        )
    else:
        scheduler = StepDecay(optimizer, settings.decay_every, settings.decay_gamma)
    model, optimizer = accelerator.prepare(model, optimizer)

    first_epoch, history = 1, {"step_loss": [], "epochs": []}
    if resume and out is not None:
        last = ckpt.newest_intact(out)
        if last is None:
            warnings.warn(
                f"{out}: no intact checkpoint to resume from; training from epoch 1", stacklevel=3
            )
        else:
            done, history = ckpt.load_checkpoint(last, accelerator, module, optimizer, scheduler)
            first_epoch = done + 1
            if on_resumed is not None:
                on_resumed()

    train_seconds = 0.0
    model.train()
    for epoch in range(first_epoch, settings.epochs + 1):
        if isinstance(scheduler, PlateauDecay) and scheduler.stopped:
            break  # resumed from the checkpoint of the epoch that ended the run
        perm = epoch_order(settings.seed, epoch, num_samples)
        name = f"{stage} {epoch}/{settings.epochs}"
        report(progress, name, 0, steps)
        t0 = time.perf_counter()
        losses = []
        for step in range(steps):
            lo = step * b * world + accelerator.process_index * b
            loss = _loss(model(make_batch(perm[lo : lo + b])))
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the training loss became {loss.item()} at epoch {epoch}, step {step + 1}"
                )
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if settings.grad_clip > 0:
                accelerator.clip_grad_norm_(
                    [p for grp in optimizer.param_groups for p in grp["params"]],
                    settings.grad_clip,
                )
            optimizer.step()
            losses.append(loss.item())
            report(
                progress,
                name,
                step + 1,
                steps,
                {
                    "loss": loss.item(),
                    "samples_s": (step + 1) * b * world / (time.perf_counter() - t0),
                },
            )
            if log:
                accelerator.log({"train/loss": loss.item()}, step=(epoch - 1) * steps + step)
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        lr = optimizer.param_groups[0]["lr"]
        val = validate(model, epoch) if validate is not None else {}
        hold = bool(hold_decay is not None and epoch < settings.epochs and hold_decay(val))
        if isinstance(scheduler, PlateauDecay):
            assert score is not None
            scheduler.step(epoch, score(val), hold=hold)
        else:
            scheduler.step(epoch, hold=hold)
        stopped = isinstance(scheduler, PlateauDecay) and scheduler.stopped
        history["step_loss"].extend(losses)
        history["epochs"].append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)),
                "val": val,
                "seconds": epoch_seconds,
                "lr": lr,
                **({"decay_held": True} if epoch in scheduler.held else {}),
                **({"stopped": True} if stopped else {}),
            }
        )
        if log and val:  # at the epoch's last step, so that every tracker's steps increase
            accelerator.log({f"val/{k}": v for k, v in val.items()}, step=epoch * steps)
        if out is not None:
            ckpt.save_checkpoint(
                accelerator,
                module,
                optimizer,
                scheduler,
                epoch,
                history,
                out,
                config or {},
                settings.keep_checkpoints,
            )
        if stopped:
            break
    return FitResult(model, history, first_epoch, train_seconds, steps)
