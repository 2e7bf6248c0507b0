"""Stage-1 projector training and instruction tuning (MRT and the VQA baselines).

- :func:`stage1`: the LLaVA-style model's projector alone learns to caption the train images of
  the VQA mini-benchmarks (next-token loss on the caption); everything else stays frozen.
- :func:`tune`: instruction tuning on one VQA mini-benchmark with next-token loss on the answer.
  ``method``: ``mrt`` (representation edits), ``projector`` (the projector alone, continued from
  stage 1), ``lora`` (PEFT LoRA on the LLM) or ``zero-shot`` (the stage-1 model, no tuning).
  Test exact match is scored on greedy generations.
- the VQA table over all of them is :mod:`mmtune.recipes.vqa_table`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from mmtune._version import __version__
from mmtune.data.vqa import VQA_BENCHMARKS, exact_match
from mmtune.methods.concat import (
    PeftAdapterConfig,
)
from mmtune.methods.lmm_tuning import get_lmm_tuning, lmm_tunings, load_lmm_adapter
from mmtune.methods.mrt import MRTConfig, MRTControl, MRTModel
from mmtune.models.llm import enable_activation_checkpointing
from mmtune.models.lmm import LlavaStyleModel, LMMConfig, build_lmm, load_lmm
from mmtune.training import checkpoint as ckpt
from mmtune.training import loop
from mmtune.training.adapter import front_matter, hub_id
from mmtune.training.loop import FitSettings
from mmtune.training.rundir import config_differences
from mmtune.utils.adapter_file import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    atomic_write,
    count_parameters,
)
from mmtune.utils.io import read_json
from mmtune.utils.progress import Progress, tracked

__all__ = [
    "Stage1Config",
    "TuneConfig",
    "answer",
    "generate_answers",
    "stage1",
    "tune",
    "vqa_reliance",
]

Method = Literal["mrt", "projector", "lora", "zero-shot"]
METHODS: tuple[str, ...] = lmm_tunings()
"""The registered ``lmm tune`` methods (:mod:`mmtune.methods.lmm_tuning`)."""
DEFAULT_LR = {name: get_lmm_tuning(name).default_lr for name in METHODS}
CAPTION_PROMPT = "<image>\nDescribe the image."


def _prompt(item: dict[str, Any]) -> str:
    return f"<image>\n{item['question']}"


@dataclass
class Stage1Config:
    """Stage 1: train only the projector on captions of the benchmarks' train images."""

    lmm: LMMConfig = field(default_factory=LMMConfig)
    """The LLaVA-style model (LLM, vision encoder, projector kind, system prompt)."""
    benchmarks: list[str] = field(default_factory=lambda: ["digits", "shapes"])
    """VQA mini-benchmarks whose train images are captioned."""
    num_samples: int = 400
    """Items per benchmark (train / val / test = 60 / 15 / 25 %)."""
    epochs: int = 1
    """Passes over the captions."""
    batch_size: int = 8
    """Samples per step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    grad_clip: float = 0.0
    """Max global gradient norm (0: off)."""
    seed: int = 0
    """Initialisation and order."""
    resume: bool = False
    """Continue from the newest intact checkpoint in output_dir (same settings but epochs)."""
    output_dir: Path = Path("runs/lmm/stage1")
    """Where the projector (an ``lmm-projector`` directory) and results.json go."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""

    def __post_init__(self) -> None:
        _check_benchmarks(self.benchmarks, "Stage1Config.benchmarks")
        for name in ("num_samples", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"Stage1Config.{name} must be >= 1")
        self.output_dir = Path(self.output_dir)


@dataclass
class TuneConfig:
    """Instruction tuning of a stage-1 model on one VQA mini-benchmark."""

    benchmark: str = "digits"
    """``digits`` ("Which digit is shown?") or ``shapes`` ("What colour is the square?")."""
    method: Method = "mrt"
    """``mrt``, ``projector``, ``lora`` or ``zero-shot``."""
    base: Path = Path("runs/lmm/stage1")
    """Stage-1 directory (the frozen base model)."""
    mrt: MRTConfig = field(default_factory=MRTConfig)
    """MRT edits (method ``mrt``)."""
    peft: PeftAdapterConfig = field(default_factory=PeftAdapterConfig)
    """LoRA (method ``lora``)."""
    num_samples: int = 400
    """Items of the benchmark (train / val / test = 60 / 15 / 25 %)."""
    epochs: int = 2
    """Passes over the train split."""
    batch_size: int = 8
    """Samples per step."""
    lr: float | None = None
    """AdamW learning rate (None: the method's default, LMMTuning.default_lr)."""
    decay_every: int | None = None
    """Multiply the learning rate by decay_gamma every this many epochs (null: constant)."""
    decay_gamma: float = 0.1
    """Step-decay factor."""
    grad_clip: float = 0.0
    """Max global gradient norm (0: off)."""
    seed: int = 0
    """Initialisation and order (the splits are fixed)."""
    checkpoint: bool = True
    """Save an epoch checkpoint in ``output_dir/checkpoints`` (what ``resume`` continues)."""
    resume: bool = False
    """Continue from the newest intact checkpoint in output_dir (same settings but epochs)."""
    max_new_tokens: int = 6
    """Greedy tokens generated per answer."""
    eval_batch_size: int = 16
    """Samples per generation batch."""
    val_curve: bool = True
    """Score val exact match after every epoch (results.json ``curve``; the last epoch's score
    is the final val score, not computed twice)."""
    output_dir: Path = Path("runs/lmm/tune")
    """results.json and the adapter go here."""
    save_adapter: bool = True
    """Write the trained tensors (``adapter/``)."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    gradient_checkpointing: bool = False
    """Activation checkpointing of the frozen LLM's layers (non-reentrant): less activation
    memory for about one more forward of the LLM; the MRT edits sit on layer outputs,
    outside each replay, so results equal the run without it."""

    def __post_init__(self) -> None:
        _check_benchmarks([self.benchmark], "TuneConfig.benchmark")
        if self.method not in METHODS:
            raise ValueError(f"TuneConfig.method must be one of {METHODS}, got {self.method!r}")
        for name in ("num_samples", "epochs", "batch_size", "max_new_tokens", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TuneConfig.{name} must be >= 1")
        self.base, self.output_dir = Path(self.base), Path(self.output_dir)

    @property
    def learning_rate(self) -> float:
        return get_lmm_tuning(self.method).default_lr if self.lr is None else self.lr


def _check_benchmarks(names: list[str], where: str) -> None:
    bad = [n for n in names if n not in VQA_BENCHMARKS]
    if bad or not names:
        raise ValueError(f"{where}: {bad or names} not among {sorted(VQA_BENCHMARKS)}")


# ----------------------------------------------------------------------------- loops


def _pixels(model: LlavaStyleModel, items: list[dict[str, Any]]) -> list[torch.Tensor]:
    """Each item's preprocessed image (1, 3, S, S), computed once."""
    return [model.tower.preprocess([it["image"]]) for it in items]


def _batches(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


class _LossOf(nn.Module):
    """``forward(batch)`` is the wrapped model's next-token loss, so that accelerate's
    (DDP) wrapper sees the loss computation as the forward it synchronises."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> torch.Tensor:
        return self.model.loss(batch)


RESUMABLE_LMM = {"epochs", "resume", "threads", "output_dir", "val_curve"}
"""TuneConfig / Stage1Config fields a resumed run may change."""


def _check_resume(out: Path, config: dict[str, Any]) -> None:
    """Resuming with other settings than the checkpoint's is one error naming them."""
    last = ckpt.newest_intact(out)
    if last is None:
        return
    saved = ckpt.load_state(last, "state").get("config", {})
    diff = [d for d in config_differences(saved, config) if d.split(":")[0] not in RESUMABLE_LMM]
    if diff:
        raise ValueError(f"{out}: cannot resume with other settings: {'; '.join(diff)}")


def fit(
    model: LlavaStyleModel | MRTModel,
    items: list[dict[str, Any]],
    pixels: list[torch.Tensor],
    *,
    prompt: Callable[[dict[str, Any]], str],
    target: str,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    decay_every: int | None = None,
    decay_gamma: float = 0.1,
    grad_clip: float = 0.0,
    out: Path | None = None,
    config: dict[str, Any] | None = None,
    resume: bool = False,
    on_step: Callable[[int, int, float], None] | None = None,
    stage: str = "epoch",
    validate: Callable[[int], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """AdamW (no weight decay) on the trainable tensors with next-token loss on
    ``item[target]``, through the shared loop (:func:`mmtune.training.loop.fit`: accelerate,
    DDP, schedule, clipping, epoch checkpoints in ``out``, ``resume``).

    ``validate(epoch)`` scores the model after each epoch (the main process only); the model is
    put back in training mode afterwards. The returned ``"epochs"`` is the per-epoch curve."""
    from accelerate import Accelerator

    base = model.base_model if isinstance(model, MRTModel) else model
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if out is not None and not resume and accelerator.is_main_process:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # an older run's epochs
    if out is not None and resume:
        _check_resume(out, config or {})
    accelerator.wait_for_everyone()
    settings = FitSettings(
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        optimizer="adamw",
        decay_every=decay_every,
        decay_gamma=decay_gamma,
        grad_clip=grad_clip,
        keep_checkpoints=1,
    )
    steps = epochs * (len(items) // (batch_size * accelerator.num_processes))
    done = [0]

    def progress(_stage: str, step: int, _total: int, info: Any) -> None:
        if step and on_step is not None:
            done[0] += 1
            on_step(done[0], steps, float(info["loss"]))

    def make_batch(idx: list[int]) -> Any:
        return base.batch(
            [prompt(items[i]) for i in idx],
            [None] * len(idx),
            answers=[items[i][target] for i in idx],
            pixel_values=[pixels[i] for i in idx],
        ).to(accelerator.device)

    def score(_prepared: Any, epoch: int) -> dict[str, float]:
        if validate is None or not accelerator.is_main_process:
            return {}
        val = validate(epoch)
        model.train()
        return val

    fitted = loop.fit(
        _LossOf(model),
        accelerator=accelerator,
        num_samples=len(items),
        make_batch=make_batch,
        param_groups=[{"params": params, "lr": lr}],
        settings=settings,
        out=out,
        config=config,
        resume=resume,
        progress=progress if accelerator.is_main_process else None,
        stage=stage,
        validate=score,
    )
    model.eval()
    losses = fitted.history["step_loss"]
    return {
        "losses": losses,
        "epochs": fitted.history["epochs"],
        "train_seconds": fitted.train_seconds,
        "steps": len(losses),
        "processes": accelerator.num_processes,
        "main": accelerator.is_main_process,
        "accelerator": accelerator,
    }


@torch.no_grad()
def generate_answers(
    model: LlavaStyleModel | MRTModel,
    prompts: list[str],
    pixels: list[torch.Tensor],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 6,
    progress: Progress | None = None,
    stage: str = "answer",
) -> list[str]:
    """Greedy answers, batch by batch (left-padded; equal to one-by-one generation);
    ``progress`` hears ``stage`` once per batch (:mod:`mmtune.utils.progress`)."""
    base = model.base_model if isinstance(model, MRTModel) else model
    model.eval()
    out: list[str] = []
    batches = _batches(len(prompts), batch_size)
    for idx in tracked(batches, progress, stage, len(batches)):
        batch = base.batch(
            [prompts[i] for i in idx], [None] * len(idx), pixel_values=[pixels[i] for i in idx]
        ).to(base.device)
        tokens, _ = model.generate(batch, max_new_tokens)
        out += base.decode(tokens)
    return out


def vqa_reliance(
    model: LlavaStyleModel | MRTModel,
    items: list[dict[str, Any]],
    pixels: list[torch.Tensor],
    headline: float,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 6,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Exact match again with every item's image taken from another item (the question kept).

    The donors are a seeded derangement (:func:`mmtune.metrics.derangement`; each VQA item has
    an image of its own); ``drop = headline - deranged`` is the model's reliance on the image
    (docs/design.md section 9), as in ``mmtune train``'s results.json. Fewer than 2 items: None."""
    from mmtune.metrics import RELIANCE_CONVENTIONS, derangement

    out: dict[str, Any] = {"metric": "exact_match", "headline": headline, "swapped": ["image"]}
    if len(items) < 2:
        return {**out, "deranged": None, "drop": None, "conventions": RELIANCE_CONVENTIONS}
    donors = derangement(len(items), seed)
    preds = generate_answers(
        model,
        [_prompt(it) for it in items],
        [pixels[d] for d in donors],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
        stage="reliance",
    )
    deranged = exact_match(preds, [it["answer"] for it in items])
    return {
        **out,
        "deranged": deranged,
        "drop": headline - deranged,
        "seed": seed,
        "conventions": RELIANCE_CONVENTIONS,
    }


def answer(
    model: LlavaStyleModel | MRTModel,
    prompt: str,
    images: list[Any],
    *,
    control: MRTControl | None = None,
    max_new_tokens: int = 16,
) -> str:
    """One prompt with its images -> the generated text (MRT: under ``control``)."""
    base = model.base_model if isinstance(model, MRTModel) else model
    if isinstance(model, MRTModel):
        model.set_control(control)
    elif control is not None:
        raise ValueError("control applies to MRT models only (load one with --adapter)")
    batch = base.batch([prompt], [images]).to(base.device)
    with torch.no_grad():
        tokens, _ = model.generate(batch, max_new_tokens)
    return base.decode(tokens)[0]


def predict(*args: Any, **kwargs: Any) -> list[str]:
    """Deprecated name of :func:`generate_answers` (removed in mmtune 0.5)."""
    import warnings

    warnings.warn(
        "mmtune.recipes.instruct.predict is deprecated (removed in mmtune 0.5); use "
        "generate_answers",
        DeprecationWarning,
        stacklevel=2,
    )
    return generate_answers(*args, **kwargs)


# ----------------------------------------------------------------------------- stage 1


def _threads(n: int | None) -> None:
    if n is not None:
        torch.set_num_threads(n)


def _write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def stage1(
    cfg: Stage1Config, progress: Callable[[int, int, float], None] | None = None
) -> dict[str, Any]:
    """Train the projector on captions; writes ``cfg.output_dir`` (loadable by ``load_lmm``)."""
    _threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_lmm(cfg.lmm)
    items = []
    for name in cfg.benchmarks:
        items += VQA_BENCHMARKS[name](num_samples=cfg.num_samples)["train"]
    model.projector.requires_grad_(True)
    pixels = _pixels(model, items)
    log = fit(
        model,
        items,
        pixels,
        prompt=lambda _it: CAPTION_PROMPT,
        target="caption",
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        grad_clip=cfg.grad_clip,
        out=cfg.output_dir,
        config=_jsonable(asdict(cfg)),
        resume=cfg.resume,
        on_step=progress,
        stage="stage 1 epoch",
    )
    model.projector.requires_grad_(False)
    if not log["main"]:
        log["accelerator"].wait_for_everyone()
        return {}
    model.save_projector(cfg.output_dir)
    results = {
        "stage": 1,
        "config": _jsonable(asdict(cfg)),
        "captions": len(items),
        "params": _params(model),
        "train_seconds": log["train_seconds"],
        "processes": log["processes"],
        "loss_first": log["losses"][0],
        "loss_last_10": float(np.mean(log["losses"][-10:])),
        "losses": log["losses"],
    }
    _write_json(cfg.output_dir / "results.json", results)
    log["accelerator"].wait_for_everyone()
    return results


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _params(model: torch.nn.Module) -> dict[str, Any]:
    c = count_parameters(model)
    return {"trainable": c.trainable, "total": c.total, "share": c.share}


# ----------------------------------------------------------------------------- tuning


def _save(cfg: TuneConfig, model: LlavaStyleModel | MRTModel, results: dict[str, Any]) -> None:
    """``adapter/``: what the method saves (:class:`LMMTuning` ``save``) and a model card."""
    out = cfg.output_dir / "adapter"
    base = model.base_model if isinstance(model, MRTModel) else model
    save = get_lmm_tuning(cfg.method).save
    assert save is not None  # only methods that train are saved
    save(model, out, cfg.base, hub_id(base.config.llm), cfg.peft)
    with atomic_write(out / "README.md") as tmp:
        tmp.write_text(_lmm_card(cfg, model, results))


def _lmm_card(cfg: TuneConfig, model: LlavaStyleModel | MRTModel, results: dict[str, Any]) -> str:
    base = model.base_model if isinstance(model, MRTModel) else model
    head = {
        "library_name": get_lmm_tuning(cfg.method).library,
        "base_model": hub_id(base.config.llm),
        "tags": ["mmtune", f"lmm-{cfg.method}", "visual-question-answering", "llava-style"],
        "datasets": [f"vqa-{cfg.benchmark} (mmtune mini-benchmark)"],
        "pipeline_tag": "image-text-to-text",
    }
    load = get_lmm_tuning(cfg.method).load_snippet
    lines = [
        front_matter(head),
        f"# {cfg.method} on VQA {cfg.benchmark}: a LLaVA-style {base.config.llm} + "
        f"{base.config.vision}",
        "",
        f"Tuned with mmtune {__version__} on the stage-1 base `{cfg.base}` (projector "
        f"{base.config.projector}); frozen models not included.",
        "",
        f"- **Training:** {cfg.epochs} epochs over {results['steps']} steps, lr "
        f"{cfg.learning_rate}, batch {cfg.batch_size}, seed {cfg.seed}; "
        f"{results['params']['trainable']:,} trained tensors' values.",
        f"- **Metric:** {results['metric']}.",
        "",
        "| split | exact match | samples |",
        "|---|---|---|",
        *[
            f"| {s} | {results[s]['exact_match']:.4f} | {results[s]['num_samples']} |"
            for s in ("val", "test")
        ],
        "",
        "## How to load",
        "",
        "```bash",
        "mmtune lmm generate --adapter path/to/adapter --image picture.png "
        "--prompt '<image> the question'",
        "```",
        "",
        "```python",
        load,
        "```",
    ]
    return "\n".join(lines) + "\n"


def load_tuned(adapter: str | Path) -> LlavaStyleModel | MRTModel:
    """The model a ``lmm tune`` run saved in ``adapter`` (MRT, projector or LoRA), ready to
    generate (:func:`mmtune.methods.lmm_tuning.load_lmm_adapter`)."""
    return load_lmm_adapter(adapter)


def _check_unseen(cfg: TuneConfig) -> None:
    """Refuse a stage-1 base that captioned this run's val or test images.

    A benchmark's items are a prefix of one fixed sequence and train comes first, so stage 1's
    train images (the first 60 % of its ``num_samples``) stay inside this run's train split
    exactly when stage 1 used at most this run's ``num_samples``. A base without stage 1's
    results.json (built elsewhere) is not checked."""
    path = cfg.base / "results.json"
    if not path.is_file():
        return
    try:
        s1 = json.loads(path.read_text()).get("config", {})
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{path}: not stage 1's results.json ({err})") from None
    used = s1.get("num_samples")
    seen = cfg.benchmark in s1.get("benchmarks", []) and isinstance(used, int)
    if seen and used > cfg.num_samples:
        raise ValueError(
            f"{path}: stage 1 captioned the train images of {used} {cfg.benchmark} items, "
            f"more than this run's num_samples {cfg.num_samples}, so some of its val or "
            f"test images were seen; use num_samples >= {used} or another base"
        )


def tune(
    cfg: TuneConfig,
    progress: Callable[[int, int, float], None] | None = None,
    answers: Progress | None = None,
) -> dict[str, Any]:
    """Instruction-tune (or, for ``zero-shot``, only evaluate) and write results.json.

    ``progress(step, steps, loss)`` hears each training step; ``answers`` the val and test
    answering, batch by batch (:mod:`mmtune.utils.progress`)."""
    _threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    _check_unseen(cfg)
    base = load_lmm(cfg.base)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(base.llm)
    tuning = get_lmm_tuning(cfg.method)
    model = tuning.prepare(base, cfg.mrt, cfg.peft)
    data = VQA_BENCHMARKS[cfg.benchmark](num_samples=cfg.num_samples)
    pixels = {k: _pixels(base, v) for k, v in data.items()}
    log: dict[str, Any] = {"train_seconds": 0.0, "losses": [], "steps": 0, "processes": 1}
    log["main"], log["accelerator"], log["epochs"] = True, None, []
    scores: dict[str, dict[str, Any]] = {}

    def score(split: str) -> dict[str, Any]:
        items, start = data[split], time.perf_counter()
        preds = generate_answers(
            model,
            [_prompt(it) for it in items],
            pixels[split],
            batch_size=cfg.eval_batch_size,
            max_new_tokens=cfg.max_new_tokens,
            progress=answers,
            stage=f"answer {split}",
        )
        scores[split] = {
            "exact_match": exact_match(preds, [it["answer"] for it in items]),
            "num_samples": len(items),
            "seconds": time.perf_counter() - start,
        }
        return {"preds": preds, **scores[split]}

    def val_epoch(epoch: int) -> dict[str, float]:
        return {"exact_match": score("val")["exact_match"]}

    if tuning.trains:
        log = fit(
            model,
            data["train"],
            pixels["train"],
            prompt=_prompt,
            target="answer",
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.learning_rate,
            seed=cfg.seed,
            decay_every=cfg.decay_every,
            decay_gamma=cfg.decay_gamma,
            grad_clip=cfg.grad_clip,
            out=cfg.output_dir if cfg.checkpoint or cfg.resume else None,
            config=_jsonable(asdict(cfg)),
            resume=cfg.resume,
            on_step=progress,
            stage=f"{cfg.method} epoch",
            validate=val_epoch if cfg.val_curve else None,
        )
    if not log["main"]:  # the main process scores and writes; the others are done
        log["accelerator"].wait_for_everyone()
        return {}
    if "val" not in scores:  # else the last epoch's val score is the final one
        score("val")
    items, preds = data["test"], score("test")["preds"]
    examples = [
        {"id": it["id"], "answer": it["answer"], "prediction": p}
        for it, p in zip(items[:8], preds[:8], strict=True)
    ]
    reliance = vqa_reliance(
        model,
        items,
        pixels["test"],
        scores["test"]["exact_match"],
        batch_size=cfg.eval_batch_size,
        max_new_tokens=cfg.max_new_tokens,
        progress=answers,
    )
    curve = [
        {
            "epoch": e["epoch"],
            "train_loss": e["train_loss"],
            "val_exact_match": (e.get("val") or {}).get("exact_match"),
            "seconds": e["seconds"],
        }
        for e in log["epochs"]
    ]
    results = {
        "benchmark": cfg.benchmark,
        "method": cfg.method,
        "seed": cfg.seed,
        "lr": cfg.learning_rate if tuning.trains else None,
        "config": _jsonable(asdict(cfg)),
        # the stage-1 weights this run used (load_lmm verified the digest; a rebuilt base is
        # not bitwise the one before)
        "base_sha256": read_json(cfg.base / ADAPTER_CONFIG_NAME)["sha256"][ADAPTER_WEIGHTS_NAME],
        "params": _params(model),
        "train_seconds": log["train_seconds"],
        "steps": log["steps"],
        "processes": log["processes"],
        "losses": log["losses"],
        "curve": curve,
        "val": scores["val"],
        "test": scores["test"],
        "reliance": reliance,
        "examples": examples,
        "metric": "exact match after lower-casing, removing punctuation, collapsing spaces",
    }
    if cfg.save_adapter and tuning.trains:
        _save(cfg, model, results)
    _write_json(cfg.output_dir / "results.json", results)
    if log["accelerator"] is not None:
        log["accelerator"].wait_for_everyone()
    return results


def load_for_generation(adapter: Path | None, base: Path | None) -> LlavaStyleModel | MRTModel:
    """A ``lmm tune`` adapter directory (:func:`load_tuned`) or a stage-1 directory."""
    if adapter is not None:
        return load_tuned(adapter)
    if base is None:
        raise ValueError(
            "give --adapter (an MRT adapter directory) or --base (a stage-1 directory)"
        )
    return load_lmm(base).eval()


def evaluate_adapter(
    adapter: Path | str,
    benchmark: str,
    *,
    control: MRTControl | None = None,
    num_samples: int = 400,
    split: str = "test",
    batch_size: int = 16,
    max_new_tokens: int = 6,
    progress: Progress | None = None,
    reliance: bool = True,
) -> dict[str, Any]:
    """Exact match of an MRT adapter on a VQA split under ``control`` (no training), with the
    reliance on the image (:func:`vqa_reliance`; ``reliance=False`` skips it);
    ``progress`` hears the answering, batch by batch."""
    _check_benchmarks([benchmark], "benchmark")
    data = VQA_BENCHMARKS[benchmark](num_samples=num_samples)
    if split not in data:
        raise ValueError(f"split {split!r}: use one of {sorted(data)}")
    model = load_tuned(adapter)
    if isinstance(model, MRTModel):
        model.set_control(control)
    elif control is not None and control != MRTControl():
        raise ValueError(f"{adapter}: control applies to MRT adapters only")
    items = data[split]
    pixels = _pixels(model.base_model if isinstance(model, MRTModel) else model, items)
    preds = generate_answers(
        model,
        [_prompt(it) for it in items],
        pixels,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
        stage=f"answer {split}",
    )
    em = exact_match(preds, [it["answer"] for it in items])
    extra: dict[str, Any] = {}
    if reliance:
        extra["reliance"] = vqa_reliance(
            model,
            items,
            pixels,
            em,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            progress=progress,
        )
    return {
        "adapter": str(adapter),
        "benchmark": benchmark,
        "split": split,
        "num_samples": len(items),
        "control": asdict(model.control) if isinstance(model, MRTModel) else None,
        "exact_match": em,
        **extra,
        "predictions": preds,
    }
