"""``mmtune bench``: the cost of each way of giving the LLM a modality, measured side by side.

For one LLM (the embedded SmolLM2, any causal LM directory, or a named shape such as
``llama-2-7b`` built with random weights and optionally fewer layers), every method runs in the
same process on the same inputs, for each text length T and image-token count N:

- ``text``: the frozen LLM on T text tokens (the floor);
- ``mit``: MiT (the ``mit`` config; by default the paper's layers, residual form) on T text
  tokens and one modality vector I;
  ``mit_cached`` is its training step from cached states entering the first infused layer
  (what ``cache_lower_layers`` does from the second epoch on);
- ``concat``, ``concat_lora``, ``concat_ia3``: N projected image tokens before the T text
  tokens (LLaVA-style MLP projector; plus LoRA or IA3 adapters from PEFT).

MiT and text rows exist only for N = 0: image tokens never enter their LLM, so their cost does
not depend on N (the plot draws them flat). The frozen image encoder is not timed (it costs the
same for every method that uses the image).

Measured per cell: forward time (inference, ``no_grad``) and training-step time (forward, a
scalar loss on the last token, backward, Adam step), each the median of ``repeats`` runs after
``warmup`` runs; FLOPs of both (``torch.utils.flop_counter``, counted during a warm-up run);
bytes of tensors saved for backward (``saved_tensors_hooks``, storages counted once, frozen
weights excluded); peak memory of a training step (CUDA: ``max_memory_allocated``; CPU: the
model's parameter bytes plus the peak rise of the process's resident set while the step runs,
sampled every millisecond after ``malloc_trim``); trainable parameters. MiT's forward is
also timed against the same model with the adapter off, alternating run by run, so that drift
in the machine's speed cancels in the ratio (``paired_*``).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mmtune._version import __version__
from mmtune.methods.concat import PeftAdapterConfig, TokenProjector, inject_peft
from mmtune.methods.mit import MiTConfig, MiTModel, inject_mit
from mmtune.methods.registry import get_method
from mmtune.models.shapes import SHAPES, shape_config
from mmtune.utils.io import atomic_write

__all__ = ["BENCH_METHODS", "BenchConfig", "plot_bench", "run_bench"]

BENCH_METHODS = ("text", "mit", "mit_cached", "concat", "concat_lora", "concat_ia3")


@dataclass(frozen=True)
class BenchCell:
    """What one bench label measures: a registered method, its PEFT adapter, and whether the
    lower-layer cache serves the layers below the first infused one."""

    method: str
    peft: str = "none"
    cached: bool = False

    @property
    def reads(self) -> str:
        """How the method's modality enters (the Method registry's ``reads``)."""
        return get_method(self.method).reads


BENCH_CELLS: dict[str, BenchCell] = {
    "text": BenchCell("text"),
    "mit": BenchCell("mit"),
    "mit_cached": BenchCell("mit", cached=True),
    "concat": BenchCell("concat"),
    "concat_lora": BenchCell("concat", "lora"),
    "concat_ia3": BenchCell("concat", "ia3"),
}
"""The bench's labels (rows of bench.json) and what each measures."""


@dataclass
class BenchConfig:
    """What ``mmtune bench`` measures."""

    llm: str = "smollm2-135m"
    """An embedded LLM, a model directory, or a named shape (random weights): llama-2-7b,
    llama-2-13b, smollm2-135m-shape."""
    num_layers: int | None = None
    """Keep only this many decoder layers (LLaMA-2-7B-shaped runs on a CPU); None: all."""
    methods: list[str] = field(default_factory=lambda: list(BENCH_METHODS))
    """Methods to measure (see the module docs)."""
    text_lengths: list[int] = field(default_factory=lambda: [32, 64, 128])
    """Text tokens per sample."""
    image_tokens: list[int] = field(default_factory=lambda: [0, 64, 256, 576])
    """Image tokens per sample for the concatenation methods (576 = CLIP ViT-L/14-336)."""
    batch_size: int = 8
    """Samples per forward / step."""
    d_image: int = 1024
    """Width of the image features (1024: CLIP ViT-L patch features; MiT reads one vector of
    this width, concatenation one per token)."""
    mit: MiTConfig = field(default_factory=MiTConfig)
    """MiT settings (d_modality is set to d_image)."""
    peft: PeftAdapterConfig = field(default_factory=PeftAdapterConfig)
    """LoRA / IA3 settings."""
    warmup: int = 1
    """Untimed runs per cell before timing (FLOPs are counted in the first)."""
    repeats: int = 3
    """Timed runs per cell (the median is reported)."""
    max_seconds: float = 60.0
    """Stop repeating a cell once its timed runs took this long (at least one timed run)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the frozen LLM."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    seed: int = 0
    """Seed of random weights and inputs."""

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in BENCH_METHODS]
        if bad:
            raise ValueError(f"BenchConfig.methods: unknown {bad}; known: {BENCH_METHODS}")
        if not self.text_lengths or min(self.text_lengths) < 2:
            raise ValueError("BenchConfig.text_lengths must be non-empty, each >= 2")
        if not self.image_tokens or min(self.image_tokens) < 0:
            raise ValueError("BenchConfig.image_tokens must be non-empty, each >= 0")
        if self.batch_size < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("BenchConfig: batch_size, repeats >= 1 and warmup >= 0")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"BenchConfig.num_layers must be >= 1, got {self.num_layers}")


# ----------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096  # resident pages


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _PeakRSS:
    """Peak resident-set rise while the block runs, sampled every millisecond."""

    def __enter__(self) -> _PeakRSS:
        _trim()
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def rise(self) -> int:
        return self.peak - self.base


@contextlib.contextmanager
def _saved_bytes(exclude: set[int]) -> Iterator[dict[str, int]]:
    """Bytes of tensors autograd saves for backward (storages counted once)."""
    seen: dict[int, int] = {}
    out = {"bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in exclude and ptr not in seen:
                seen[ptr] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out["bytes"] = sum(seen.values())


def _count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _timed(fn: Callable[[], Any], cfg: BenchConfig, device: torch.device) -> list[float]:
    times: list[float] = []
    spent = 0.0
    while len(times) < cfg.repeats and (not times or spent < cfg.max_seconds):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    return times


# ----------------------------------------------------------------------------- models


def load_bench_llm(cfg: BenchConfig) -> nn.Module:
    """The frozen LLM to measure: loaded weights, or a named shape with random weights."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    torch.manual_seed(cfg.seed)
    name = cfg.llm.removesuffix("-shape")
    if (cfg.llm in SHAPES and cfg.llm != "smollm2-135m") or cfg.llm.endswith("-shape"):
        overrides = {"num_hidden_layers": cfg.num_layers} if cfg.num_layers else {}
        config = shape_config(name, **overrides)
        config._attn_implementation = "sdpa"
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        from mmtune.models.llm import load_llm

        model, _ = load_llm(cfg.llm, dtype=dtype)
        if cfg.num_layers:
            decoder = model.get_decoder()
            decoder.layers = nn.ModuleList(list(decoder.layers)[: cfg.num_layers])
            model.config.num_hidden_layers = cfg.num_layers
    model.requires_grad_(False)
    return model.eval()


class _Bench(nn.Module):
    """One method on the frozen LLM: inputs -> last-token vector -> a scalar head."""

    def __init__(self, method: str, llm: nn.Module, cfg: BenchConfig):
        super().__init__()
        cell = self.cell = BENCH_CELLS[method]
        self.method = method
        d = llm.config.hidden_size
        self.projector: TokenProjector | None = None
        self.first_layer = 1
        if cell.reads == "vector":
            mit_cfg = MiTConfig(**{**asdict(cfg.mit), "d_modality": cfg.d_image})
            self.llm = inject_mit(llm, mit_cfg)
            self.first_layer = min(self.llm.layer_ids)
        else:
            self.llm = llm
            if cell.peft != "none":
                inject_peft(llm, cell.peft, cfg.peft)
            if cell.reads == "tokens":
                self.projector = TokenProjector({"image": cfg.d_image}, d, "mlp")
        self.decoder = (llm.base_model if isinstance(llm, MiTModel) else llm).get_decoder()
        self.head = nn.Linear(d, 1)

    def inputs(self, text: torch.Tensor, image: torch.Tensor, vector: torch.Tensor):
        embeds = self.decoder.get_input_embeddings()(text)  # (B, T, d)
        if self.projector is not None and image.shape[1]:
            mask = image.new_ones(image.shape[:2], dtype=torch.long)
            tokens, _ = self.projector({"image": (image, mask)})  # (B, N, d)
            embeds = torch.cat([tokens.to(embeds.dtype), embeds], dim=1)  # (B, N + T, d)
        return embeds

    def lower_states(self, embeds: torch.Tensor) -> torch.Tensor:
        """Hidden states entering the first infused layer (what the lower-layer cache keeps)."""
        from mmtune.models.partial import states_entering

        if self.first_layer == 1:  # nothing below the first infused layer
            return embeds.detach()
        with torch.no_grad():
            return states_entering(self.decoder, self.first_layer, inputs_embeds=embeds)

    def forward(self, embeds: torch.Tensor, vector: torch.Tensor, upper_only: bool = False):
        from mmtune.models.partial import layer_slice

        start = self.first_layer - 1 if upper_only else 0
        with layer_slice(self.decoder, start, None):
            if isinstance(self.llm, MiTModel):
                with self.llm.using_modality(vector):
                    hidden = self.decoder(inputs_embeds=embeds).last_hidden_state
            else:
                hidden = self.decoder(inputs_embeds=embeds).last_hidden_state
        return self.head(hidden[:, -1].float()).squeeze(-1)  # (B,)


def _paired_forward(
    bench: _Bench, forward: Callable[[], None], cfg: BenchConfig, device: torch.device
) -> dict[str, float]:
    """MiT's forward against the frozen model's, alternating run by run so that drift in the
    machine's speed hits both alike (the frozen model is MiT with ``disable_adapter()``)."""
    on: list[float] = []
    off: list[float] = []
    for _ in range(max(cfg.repeats, 5)):
        for times, frozen in ((off, True), (on, False)):
            ctx = bench.llm.disable_adapter() if frozen else contextlib.nullcontext()
            with ctx:
                times.extend(_timed(forward, dataclasses.replace(cfg, repeats=1), device))
    return {
        "paired_forward_ms": 1e3 * statistics.median(on),
        "paired_frozen_forward_ms": 1e3 * statistics.median(off),
        "paired_runs": len(on),
    }


def _measure_cell(
    bench: _Bench, cfg: BenchConfig, device: torch.device, t: int, n: int
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(cfg.seed * 7919 + t * 31 + n)
    vocab = bench.decoder.get_input_embeddings().num_embeddings
    text = torch.randint(0, vocab, (cfg.batch_size, t), generator=g).to(device)
    image = torch.randn(cfg.batch_size, n, cfg.d_image, generator=g).to(device)
    vector = torch.randn(cfg.batch_size, cfg.d_image, generator=g).to(device)
    trainable = [p for p in bench.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-5)
    upper = bench.cell.cached
    cached = bench.lower_states(bench.inputs(text, image, vector)) if upper else None

    def forward() -> None:
        with torch.no_grad():
            bench(bench.inputs(text, image, vector), vector)

    def step() -> None:
        embeds = cached if upper else bench.inputs(text, image, vector)
        loss = bench(embeds, vector, upper_only=upper).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    row: dict[str, Any] = {"method": bench.method, "text_length": t, "image_tokens": n}
    if not bench.cell.cached:  # a cached cell's inference is the uncached one's
        row["flops_forward"] = _count_flops(forward)
        for _ in range(max(cfg.warmup - 1, 0)):
            forward()
        times = _timed(forward, cfg, device)
        row.update(forward_ms=1e3 * statistics.median(times), forward_runs=len(times))
    if bench.cell.reads == "vector" and not upper:  # adapter off, timed in alternation
        row.update(_paired_forward(bench, forward, cfg, device))
    row["flops_train_step"] = _count_flops(step)
    for _ in range(max(cfg.warmup - 1, 0)):
        step()
    times = _timed(step, cfg, device)
    row.update(train_step_ms=1e3 * statistics.median(times), train_step_runs=len(times))
    frozen = {p.untyped_storage().data_ptr() for p in bench.parameters() if not p.requires_grad}
    param_bytes = sum(p.numel() * p.element_size() for p in bench.parameters())
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        with _saved_bytes(frozen) as saved:
            step()
        _sync(device)
        row["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    else:
        with _PeakRSS() as rss, _saved_bytes(frozen) as saved:
            step()
        row["peak_memory_bytes"] = param_bytes + rss.rise
    row["saved_activation_bytes"] = saved["bytes"]
    row["trainable_parameters"] = sum(p.numel() for p in trainable)
    return row


def _cells(cfg: BenchConfig, method: str) -> list[tuple[int, int]]:
    if BENCH_CELLS[method].reads == "tokens":
        return [(t, n) for t in cfg.text_lengths for n in cfg.image_tokens]
    return [(t, 0) for t in cfg.text_lengths]


def run_bench(
    cfg: BenchConfig, progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Measure every method x cell; returns rows, ratios against the targets and the setup."""
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    base = load_bench_llm(cfg).to(device)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for method in cfg.methods:
        llm = copy.deepcopy(base) if BENCH_CELLS[method].peft != "none" else base
        bench = _Bench(method, llm, cfg).to(device)
        for t, n in _cells(cfg, method):
            row = _measure_cell(bench, cfg, device, t, n)
            rows.append(row)
            if progress is not None:
                progress(row)
        if isinstance(bench.llm, MiTModel):
            bench.llm.unload()  # hooks off: the next method sees the frozen model
        del bench, llm
        _trim()
    return {
        "config": asdict(cfg),
        "model": {
            "model_type": base.config.model_type,
            "hidden_size": base.config.hidden_size,
            "num_layers": base.config.num_hidden_layers,
            "parameters": sum(p.numel() for p in base.parameters()),
            "dtype": cfg.dtype,
        },
        "device": str(device)
        + ("" if device.type != "cuda" else f" ({torch.cuda.get_device_name(device)})"),
        "threads": torch.get_num_threads(),
        "rows": rows,
        "ratios": bench_ratios(rows),
        "seconds": time.perf_counter() - start,
        "versions": {"mmtune": __version__, "torch": torch.__version__},
        "method_notes": {
            "text": "frozen LLM, text tokens only",
            "mit": "MiT; image tokens never enter the LLM (cost independent of image_tokens)",
            "mit_cached": "MiT training step from cached states entering the first infused layer",
            "concat": "projected image tokens before the text; projector trains",
            "concat_lora": "concat + LoRA (PEFT)",
            "concat_ia3": "concat + IA3 (PEFT)",
        },
    }


def _find(rows: list[dict[str, Any]], method: str, t: int, n: int = 0) -> dict[str, Any] | None:
    for r in rows:
        if (r["method"], r["text_length"], r["image_tokens"]) == (method, t, n):
            return r
    return None


def bench_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets as ratios of rows measured in this run (missing rows are skipped)."""
    out: dict[str, Any] = {}
    lengths = sorted({r["text_length"] for r in rows})
    for t in lengths:
        mit, text = _find(rows, "mit", t), _find(rows, "text", t)
        if mit and "paired_forward_ms" in mit:
            ratio = mit["paired_forward_ms"] / mit["paired_frozen_forward_ms"]
            out[f"mit_forward_over_frozen_forward_paired@T{t}"] = {
                "value": ratio,
                "target": "<= 1.05",
                "met": ratio <= 1.05,
            }
        if mit and text:
            out[f"mit_forward_over_text_forward@T{t}"] = {
                "value": mit["forward_ms"] / text["forward_ms"],
                "target": "<= 1.05",
                "met": mit["forward_ms"] / text["forward_ms"] <= 1.05,
            }
        cached = _find(rows, "mit_cached", t)
        if mit and cached:
            ratio = mit["train_step_ms"] / cached["train_step_ms"]
            out[f"mit_step_over_mit_cached_step@T{t}"] = {
                "value": ratio,
                "target": ">= 1.2",
                "met": ratio >= 1.2,
            }
        for n in sorted({r["image_tokens"] for r in rows if r["image_tokens"]}):
            for method in (m for m, c in BENCH_CELLS.items() if c.reads == "tokens"):
                other = _find(rows, method, t, n)
                if not (mit and other):
                    continue
                speed = other["train_step_ms"] / mit["train_step_ms"]
                memory = other["peak_memory_bytes"] / mit["peak_memory_bytes"]
                key = f"{method}@N{n}_over_mit@T{t}"
                out[key] = {
                    "train_step": speed,
                    "peak_memory": memory,
                    "saved_activations": other["saved_activation_bytes"]
                    / max(mit["saved_activation_bytes"], 1),
                    "flops_train_step": other["flops_train_step"] / mit["flops_train_step"],
                }
                if (t, n) == (32, 576):
                    out[key].update(
                        target="train_step >= 15, peak_memory >= 6",
                        met=speed >= 15 and memory >= 6,
                    )
    return out


def plot_bench(result: dict[str, Any], path: Path) -> Path:
    """Cost against image tokens at each text length, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    lengths = sorted({r["text_length"] for r in rows})
    counts = sorted({r["image_tokens"] for r in rows} | set(result["config"]["image_tokens"]))
    metrics = [
        ("train_step_ms", "training step (ms)"),
        ("forward_ms", "forward (ms)"),
        ("peak_memory_bytes", "peak training memory (GB)"),
        ("flops_train_step", "training-step TFLOPs"),
    ]
    scale = {"peak_memory_bytes": 1e-9, "flops_train_step": 1e-12}
    fig, axes = plt.subplots(
        len(metrics), len(lengths), figsize=(4.2 * len(lengths), 3.2 * len(metrics)), squeeze=False
    )
    for col, t in enumerate(lengths):
        for row_i, (key, label) in enumerate(metrics):
            ax = axes[row_i][col]
            for method in result["config"]["methods"]:
                color = f"C{BENCH_METHODS.index(method)}"  # one colour per method in every panel
                pts = [r for r in rows if r["method"] == method and r["text_length"] == t]
                pts = [r for r in pts if key in r]
                if not pts:
                    continue
                if BENCH_CELLS[method].reads == "tokens":
                    xs = [r["image_tokens"] for r in pts]
                    ys = [r[key] * scale.get(key, 1) for r in pts]
                    ax.plot(xs, ys, marker="o", label=method, color=color)
                else:  # image tokens never enter the LLM: flat
                    y = pts[0][key] * scale.get(key, 1)
                    ax.plot(
                        [counts[0], counts[-1]], [y, y], linestyle="--", label=method, color=color
                    )
            ax.set_xlabel("image tokens")
            ax.set_ylabel(label)
            ax.set_yscale("log")
            ax.set_title(f"text length {t}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    model = result["model"]
    fig.suptitle(
        f"{result['config']['llm']} ({model['num_layers']} layers), batch "
        f"{result['config']['batch_size']}, {result['device']}"
    )
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


def write_bench(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return path
