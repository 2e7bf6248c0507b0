"""The ``mmtune`` command line, built from the typed configs with jsonargparse.

Every sub-command takes ``--config FILE.yaml`` as well as flags, so YAML, CLI and Python
describe the same dataclasses.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jsonargparse import auto_cli, set_parsing_settings

from mmtune._version import __version__
from mmtune.methods.mit import MiTConfig
from mmtune.methods.mrt import MRTConfig
from mmtune.recipes.bench import BenchConfig
from mmtune.recipes.compare import CompareConfig
from mmtune.recipes.instruct import Stage1Config, TuneConfig
from mmtune.recipes.smoke import SmokeDemoConfig, run_smoke_demo
from mmtune.recipes.train import TrainConfig, load_train_config
from mmtune.recipes.vqa_table import TableConfig
from mmtune.tasks import get_task
from mmtune.utils.io import atomic_write
from mmtune.utils.progress import Progress


def _documented(*sources: type, **extra: str):
    """Give a command the ``Args:`` its ``--help`` shows, from the field docstrings of the
    dataclasses it mirrors (one source of truth) and ``extra`` for its own arguments."""
    import inspect

    import docstring_parser

    def wrap(fn):
        docs: dict[str, str] = {}
        for cls in sources:
            for p in docstring_parser.parse_from_object(cls).params:
                docs.setdefault(p.arg_name, " ".join((p.description or "").split()))
        docs.update(extra)
        names = [n for n in inspect.signature(fn).parameters if docs.get(n)]
        missing = set(inspect.signature(fn).parameters) - set(names)
        if missing:
            raise TypeError(f"{fn.__name__}: no docs for {sorted(missing)}")
        body = "\n".join(f"        {n}: {docs[n]}" for n in names)
        fn.__doc__ = f"{(fn.__doc__ or '').rstrip()}\n\n    Args:\n{body}\n"
        return fn

    return wrap


def _from_config(config: type, summary: str, **extra: tuple[Any, Any, str]):
    """A command whose options are the fields of the dataclass ``config`` (with their types,
    defaults and attribute docstrings, litgpt style), plus ``extra`` = {name: (type, default,
    help)} of its own. The decorated function is called as ``fn(config_object, **extra)``, so
    no field is listed twice and a new field is a new option at once."""
    import dataclasses
    import functools
    import inspect
    import typing

    import docstring_parser

    hints = typing.get_type_hints(config)
    docs = {
        p.arg_name: " ".join((p.description or "").split())
        for p in docstring_parser.parse_from_object(config).params
    }
    params, lines = [], []
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                              annotation=hints[f.name])
        )  # fmt: skip
        if not docs.get(f.name):
            raise TypeError(f"{config.__name__}.{f.name}: no docstring (it is the option's help)")
        lines.append(f"        {f.name}: {docs[f.name]}")
    for name, (annotation, default, doc) in extra.items():
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                              annotation=annotation)
        )  # fmt: skip
        lines.append(f"        {name}: {doc}")

    def wrap(fn):
        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            own = {name: kwargs.pop(name) for name in extra}
            return fn(config(**kwargs), **own)

        command.__signature__ = inspect.Signature(params)  # what jsonargparse reads
        command.__doc__ = (
            f"{summary}\n\n    The options are the fields of {config.__module__}."
            f"{config.__qualname__}.\n\n    Args:\n" + "\n".join(lines) + "\n"
        )
        del command.__wrapped__  # the signature above, not fn's
        command.config = config  # type: ignore[attr-defined]
        return command

    return wrap


def demo(configs: Path | None = None, workers: int | None = None) -> None:
    """The main job: MiT beside the text-only method on the three mini-benchmarks, with each
    run's reliance on the modality (the metric with every sample's modality taken from another
    sample). SmolLM2-135M (frozen) + MobileNetV2 (frozen), on the CPU.

    Args:
        configs: folder holding shapes-ref.yaml, digits-ve.yaml and movie-sentiment.yaml (the
            MiT runs; the text-only run is the same file with method text). Default: the demo
            configs shipped with mmtune (configs/demo in a checkout); outputs go to ./runs/demo.
        workers: runs trained at once (default min(2, CPU count), a CPU thread share each).
    """
    import time

    from mmtune.recipes.demo import DEMO_BENCHMARKS, DEMO_METHODS, run_demo
    from mmtune.utils.configs import resolve_config

    configs = resolve_config(configs if configs is not None else "demo")
    start = time.perf_counter()

    def event(kind: str, name: str, info: dict) -> None:
        if kind == "progress" and info["done"] < info["total"]:  # a wait starts or goes on
            print(
                f"  {name:<24} {info['stage']} {info['done']}/{info['total']}  "
                f"({time.perf_counter() - start:.0f} s in)",
                file=sys.stderr,
                flush=True,
            )
        if kind == "done":
            print(
                f"  done {name:<24} {info['wall_seconds']:5.0f} s  ({info['elapsed']:.0f} s in)",
                file=sys.stderr,
            )

    print(
        f"mmtune demo: {len(DEMO_BENCHMARKS) * len(DEMO_METHODS)} runs from {configs}/ "
        "(MiT and text-only on each benchmark), several at once; each prints when it ends",
        file=sys.stderr,
    )
    cells = run_demo(configs, workers=workers, on_event=event)
    print(f"\nSmolLM2-135M, frozen; test splits ({time.perf_counter() - start:.0f} s in all):")
    print(f"  {'benchmark':<16} {'method':<6} {'n':>5}  metrics  | reliance")
    for name in DEMO_BENCHMARKS:
        for method in DEMO_METHODS:
            r = cells[(name, method)]
            m, rel = r["metrics"], r["reliance"]
            reliance = (
                "no modality read"
                if rel.get("drop") is None
                else f"{rel['metric']} {rel['headline']:.3f} -> {rel['deranged']:.3f} deranged "
                f"(drop {rel['drop']:+.3f})"
            )
            print(
                f"  {name:<16} {method:<6} {m['num_samples']:>5}  "
                + ", ".join(f"{k} {m[k]:.3f}" for k in get_task(r["task"]).summary_metrics)
                + f"  | {reliance}"
            )
    print(
        "Pictures (curves, masks, scatter) and results.json: "
        + ", ".join(cells[(n, "mit")]["output_dir"] for n in DEMO_BENCHMARKS)
        + " (and each with -text)"
    )


def smoke(
    settings: SmokeDemoConfig | None = None, out: Path = Path("runs/smoke"), quiet: bool = False
) -> None:
    """Smoke demo: MiT on a tiny random LLaMA with a synthetic task (seconds, CPU).

    Args:
        settings: steps, batch size, classes, seed ... (mmtune.recipes.smoke.SmokeDemoConfig).
        out: directory for results.json and the saved adapter.
        quiet: no progress output.
    """
    from tqdm.auto import tqdm

    cfg = settings or SmokeDemoConfig()
    print(
        "mmtune smoke demo: a tiny LLaMA with RANDOM weights built in-process and a synthetic "
        "task whose label is carried only by the modality vector. It checks the MiT plumbing "
        "end to end; the real demo on pretrained models is `mmtune demo`.",
        file=sys.stderr,
    )
    bars: dict[str, tqdm] = {}

    def progress(name: str, step: int, loss: float) -> None:
        if quiet:
            return
        if name not in bars:
            bars[name] = tqdm(
                total=cfg.steps, desc=f"train {name:<9}", file=sys.stderr, mininterval=1.0
            )
        bars[name].update(1)
        bars[name].set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step + 1 == cfg.steps:
            bars[name].close()

    result = run_smoke_demo(cfg, out, progress)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "results.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")

    p = result["parameters"]
    rows = [
        ("text only (adapter disabled)", result["text_only"]["test_accuracy"]),
        ("MiT (gated form)", result["mit"]["test_accuracy"]),
        ("ceiling: linear classifier on I", result["linear_probe_on_modality"]["test_accuracy"]),
    ]
    print(f"\nMiT smoke demo (seed {cfg.seed}, {cfg.steps} steps, batch {cfg.batch_size})")
    print(
        f"  infused layers {result['infused_layers']}; trainable {p['trainable']:,} of "
        f"{p['total']:,} parameters ({100 * p['share']:.2f}%)"
    )
    print(
        f"  identity at init: max |logits - frozen logits| = "
        f"{result['identity_at_init_max_abs_diff']:.1e}"
    )
    print(f"  {'model':<34} test accuracy (chance {result['chance_accuracy']:.2f})")
    for name, acc in rows:
        print(f"  {name:<34} {acc:.3f}")
    if result["reload_max_abs_diff"] is not None:
        print(
            f"  adapter saved to {out / 'adapter'}; reloaded onto a fresh base model: max |diff| "
            f"= {result['reload_max_abs_diff']:.1e}"
        )
    print(f"  wall time {result['wall_time_s']:.1f} s; results in {out / 'results.json'}")


_PAPER_MIT = MiTConfig(d_modality=768)  # CLIP ViT-L/14 image_embeds, the paper's layers


def params(model: str = "llama-2-7b", mit: MiTConfig = _PAPER_MIT) -> None:
    """Trainable-parameter report of MiT on a model shape, counted on the meta device.

    Args:
        model: a named shape (llama-2-7b, llama-2-13b, smollm2-135m) or a model directory.
        mit: the MiT config (default: d_modality 768, the paper's layers).
    """
    from mmtune.methods.mit import inject_mit
    from mmtune.models.shapes import meta_model, shape_config

    wrapped = inject_mit(meta_model(shape_config(model)), mit)
    report = wrapped.trainable_parameters()
    print(
        f"{model}: MiT on layers {wrapped.layer_ids}, d_modality {mit.d_modality}, form {mit.form}"
    )
    print(report)


def check_embedded(question: str = "What is the capital of France?") -> None:
    """Load the embedded real models and show they work: SmolLM2 answers, MobileNetV2 labels.

    Args:
        question: asked to SmolLM2-135M-Instruct with its chat template, greedy decoding.
    """
    import time

    from mmtune.encoders.vision import load_vision_encoder
    from mmtune.models.llm import load_llm, smollm2_path

    start = time.perf_counter()
    path, hit = smollm2_path()
    prepared = time.perf_counter() - start
    model, tokenizer = load_llm(str(path))
    loaded = time.perf_counter() - start - prepared
    how = "cache hit (hashes verified)" if hit else "converted from the GGUF file"
    print(
        f"SmolLM2-135M: {how} in {prepared:.1f} s; weights and tokenizer loaded in "
        f"{loaded:.1f} s ({path})"
    )
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=32, do_sample=False)
    reply = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"  Q: {question}\n  A: {reply.strip()}")

    import skimage.data

    encoder = load_vision_encoder("mobilenet-v2")
    names = ["chelsea", "coffee", "camera"]
    pixels = encoder.preprocess([getattr(skimage.data, n)() for n in names])
    probs = encoder.classify(pixels).softmax(-1)
    top = probs.max(-1)
    print("MobileNetV2 (ImageNet), scikit-image samples:")
    for name, cls, p in zip(names, top.indices.tolist(), top.values.tolist(), strict=True):
        print(f"  {name:<8} -> class {cls} (p = {p:.3f})")


def data_inspect(
    path: Path, format: str = "auto", split: str | None = None, index: int = 0
) -> None:
    """Print a data set's split sizes and one decoded sample.

    Args:
        path: a data set file or folder (refs(unc).p, snli_ve_*.jsonl, a Food101 folder, an
            MMSA .pkl ...), or a mini-benchmark name (shapes-ref, digits-ve, movie-sentiment).
        format: refcoco, snli-ve, food101, mmsa, or auto (detected from the path).
        split: the split to take the sample from (default: the first one).
        index: which sample of that split.
    """
    from mmtune.data import load_dataset
    from mmtune.data.mini import MINI_BENCHMARKS

    if str(path) in MINI_BENCHMARKS and not Path(path).exists():
        data = MINI_BENCHMARKS[str(path)]()
    else:
        data = load_dataset(path, format)
    sizes = data.sizes()
    print(f"{data.name}: task {data.task}; {sum(sizes.values()):,} samples")
    for name, n in sizes.items():
        print(f"  {name:<8} {n:>9,}")
    if data.label_names:
        shown = ", ".join(data.label_names[:8]) + (" ..." if len(data.label_names) > 8 else "")
        print(f"  {len(data.label_names)} classes: {shown}")
    split = split or next(iter(data.splits))
    if split not in data.splits:
        raise ValueError(f"no split {split!r}; the data set has {list(data.splits)}")
    dataset = data.splits[split]
    if not 0 <= index < len(dataset):
        raise ValueError(f"index {index} is outside split {split!r} (0..{len(dataset) - 1})")
    print(f"sample {index} of {split}:")
    try:
        item = dataset[index]
        summary = data.describe(item) if data.describe else item
    except FileNotFoundError as e:  # annotations without their images: show what is there
        summary = {**dataset.metadata(index), "image": f"not decoded ({e})"}
    for key, value in summary.items():
        print(f"  {key}: {value}")


@_from_config(
    TrainConfig,
    "Train on a task: mmtune train CONFIG.yaml [--config VARIANT.yaml] [--optim.epochs=3 ...].",
    quiet=(bool, False, "No progress bars."),
)
def train(config: TrainConfig, quiet: bool = False) -> None:
    from mmtune.recipes.train import train as run

    results = run(config, progress=None if quiet else _bars())
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    m = results["metrics"]
    print(f"{results['data']['data']} ({results['task']}), test split {results['test_split']}:")
    print(
        "  "
        + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "num_samples")
        + f" (n = {m['num_samples']})"
    )
    print(_reliance_line(results["reliance"]))
    print(
        f"  trained {results['train_seconds']:.0f} s on {results['processes']} process(es); "
        f"results in {config.output_dir}/results.json"
    )


def _reliance_line(r: dict) -> str:
    if r["drop"] is None:
        why = "fewer than 2 samples" if r.get("swapped") else "this model reads no modality"
        return f"  reliance: none ({why}); {r['metric']} {r['headline']:.4f}"
    line = (
        f"  reliance: {r['metric']} {r['headline']:.4f} -> {r['deranged']:.4f} with each "
        f"sample's modality from another sample (drop {r['drop']:+.4f}"
        + (f" ± {r['drop_se']:.4f})" if r.get("drop_se") is not None else ")")
    )
    if r.get("warning"):
        line += f"\nmmtune: warning: {r['warning']}"
    return line


def ceilings(benchmark: Path, output: Path | None = None, probe_epochs: int = 30) -> None:
    """Ceilings of a benchmark: the trivial answers and scikit-learn probes on its test split.

    Args:
        benchmark: a train config YAML (its task and model name the data and the encoder).
        output: also write the result to this JSON file.
        probe_epochs: segmentation: epochs of the decoder probe (0: skip it).
    """
    from mmtune.recipes.ceilings import ceilings as run_ceilings
    from mmtune.utils.configs import resolve_config
    from mmtune.utils.io import write_json

    result = run_ceilings(load_train_config(resolve_config(benchmark)), probe_epochs, _bars())
    if output is not None:
        write_json(output, result)
    print(f"{result['data']} ({result['task']}), test split:")
    for name, entry in result["ceilings"].items():
        shown = [k for k in get_task(result["task"]).summary_metrics if k in entry]
        values = ", ".join(f"{k} {entry[k]:.3f}" for k in shown)
        print(f"  {name:<17} {values}  ({entry['sees']})")


def evaluate(run: Path, split: str = "test") -> None:
    """Score a finished run (RUN_DIR with final/) on a split of its data.

    Args:
        run: the run's output_dir.
        split: which split to score.
    """
    from mmtune.recipes.evaluate import evaluate_run, write_eval

    result = evaluate_run(run, split, write=False, progress=_bars())
    m = result["metrics"]
    print(
        f"{run} on {split}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "num_samples")
        + f" (n = {m['num_samples']})",
        flush=True,
    )
    print(_reliance_line(result["reliance"]), flush=True)
    write_eval(run, result)  # after the metrics are shown: a read-only run dir loses nothing


def predict(
    run: Path,
    text: str,
    image: Path | None = None,
    frames: Path | None = None,
    out: Path = Path("prediction.png"),
) -> None:
    """One input through a finished run: a mask overlay PNG, a class, or a sentiment score.

    Args:
        run: the run's output_dir.
        text: the referring expression, hypothesis, title or sentence.
        image: the image (segmentation, classification).
        frames: sentiment runs with frame modalities: an .npz with 'audio' / 'vision' arrays.
        out: where a segmentation overlay is written.
    """
    from mmtune.recipes.evaluate import predict as run_predict

    print(json.dumps(run_predict(run, text, image, frames, out)))


@_from_config(
    BenchConfig,
    "Cost of text / MiT / concatenation (+LoRA, +IA3) side by side: time, memory, FLOPs.",
    output=(
        Path,
        Path("runs/bench/bench.json"),
        "The JSON file to write: every row, the ratios against the targets, the setup.",
    ),
    plot=(
        bool,
        True,
        "Also write a PNG beside it: cost against image tokens, one line per method.",
    ),
)
def bench(config: BenchConfig, output: Path, plot: bool) -> None:
    from mmtune.recipes.bench import plot_bench, run_bench, write_bench

    def show(row: dict) -> None:
        fwd = f"forward {row['forward_ms']:9.1f} ms" if "forward_ms" in row else " " * 22
        print(
            f"  {row['method']:<12} T={row['text_length']:<4} N={row['image_tokens']:<4} {fwd}"
            f"  step {row['train_step_ms']:9.1f} ms  peak {row['peak_memory_bytes'] / 1e9:6.2f} GB"
            f"  saved {row['saved_activation_bytes'] / 1e6:9.1f} MB",
            flush=True,
        )

    result = run_bench(config, progress=show)
    write_bench(result, output)
    print(f"wrote {output}")
    if plot:
        print(f"wrote {plot_bench(result, output.with_suffix('.png'))}")
    for name, ratio in result["ratios"].items():
        if "target" in ratio:
            value = ratio.get("value", ratio)
            print(f"  {name}: {json.dumps(value)} (target {ratio['target']}; met: {ratio['met']})")


@_from_config(
    CompareConfig,
    "Train every variant on every benchmark with every seed; write accuracy.json / .md.",
    report_only=(bool, False, "Aggregate the runs already in output_dir without starting any."),
)
def compare(cfg: CompareConfig, report_only: bool) -> None:
    output_dir = cfg.output_dir
    from mmtune.recipes.compare import report, run_compare

    if report_only:
        table = report(output_dir)
    else:
        table = run_compare(cfg, log=lambda line: print(line, flush=True))
        for failure in table["failures"]:
            print(f"failed: {failure}")
    print(Path(output_dir, "accuracy.md").read_text())


# ----------------------------------------------------------------------------- LLaVA-style + MRT


@_from_config(
    Stage1Config,
    "Stage 1: train only the projector on captions of the VQA benchmarks' train images.",
    quiet=(bool, False, "No step lines."),
)
def lmm_stage1(cfg: Stage1Config, quiet: bool) -> None:
    from mmtune.recipes.instruct import stage1

    output_dir = cfg.output_dir
    r = stage1(cfg, progress=None if quiet else _step_printer())
    if not r:  # not the main process of a distributed run: it wrote nothing
        return
    print(
        f"stage 1: {r['captions']} captions, loss {r['loss_first']:.3f} -> "
        f"{r['loss_last_10']:.3f} (last 10 steps), {r['train_seconds']:.0f} s; "
        f"projector in {output_dir}"
    )


def _bars() -> Progress:
    """A :data:`mmtune.utils.progress.Progress` that draws one tqdm bar per stage on stderr."""
    from tqdm.auto import tqdm

    bars: dict[str, Any] = {}

    def show(stage: str, done: int, total: int, info: Mapping[str, Any] | None) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, mininterval=2.0)
        bar.update(done - bar.n)
        if info:
            bar.set_postfix({k: f"{v:.4g}" for k, v in info.items()}, refresh=False)
        if done >= total:
            bar.close()
            del bars[stage]

    return show


def _step_printer(every: float = 5.0):
    """Prints the first and last step, and a step whenever ``every`` seconds have passed."""
    import time

    last = [float("-inf")]

    def show(step: int, steps: int, loss: float) -> None:
        now = time.monotonic()
        if step == 1 or step == steps or now - last[0] >= every:
            last[0] = now
            print(f"  step {step}/{steps} loss {loss:.4f}", file=sys.stderr, flush=True)

    return show


@_from_config(
    TuneConfig,
    "Instruction-tune a stage-1 model on a VQA mini-benchmark (mrt, projector, lora, zero-shot).",
    quiet=(bool, False, "No step lines or progress bars."),
)
def lmm_tune(cfg: TuneConfig, quiet: bool) -> None:
    from mmtune.recipes.instruct import tune

    benchmark, method, output_dir = cfg.benchmark, cfg.method, cfg.output_dir
    r = tune(
        cfg,
        progress=None if quiet else _step_printer(),
        answers=None if quiet else _bars(),
    )
    if not r:  # not the main process of a distributed run: it wrote nothing
        return
    p = r["params"]
    print(
        f"{benchmark} / {method}: test exact match {r['test']['exact_match']:.3f} "
        f"(n = {r['test']['num_samples']}), val {r['val']['exact_match']:.3f}; "
        f"trainable {p['trainable']:,} of {p['total']:,} ({100 * p['share']:.4f}%); "
        f"train {r['train_seconds']:.0f} s; results in {output_dir}/results.json"
    )
    print(_reliance_line(r["reliance"]))


@_from_config(
    TableConfig,
    "The VQA table: methods x benchmarks x seeds (resumable), then vqa.json / vqa.md.",
    stage1_settings=(
        dict | None,
        None,
        "Deprecated spelling of stage1 (the Stage1Config fields); removed in mmtune 0.5.",
    ),
    report_only=(bool, False, "Aggregate the cells already in output_dir without starting any."),
)
def lmm_table(cfg: TableConfig, stage1_settings: dict | None, report_only: bool) -> None:
    import dataclasses
    import warnings

    from mmtune.recipes.instruct import Stage1Config
    from mmtune.recipes.vqa_table import table_report, vqa_table

    output_dir = cfg.output_dir
    if stage1_settings is not None:
        warnings.warn(
            "lmm table: stage1_settings is deprecated, write its fields under stage1 instead",
            DeprecationWarning,
            stacklevel=2,
        )
        cfg = dataclasses.replace(cfg, stage1=Stage1Config(**stage1_settings))
    if report_only:
        table_report(output_dir)
    else:
        vqa_table(cfg, log=lambda line: print(line, flush=True))
    print(Path(output_dir, "vqa.md").read_text())


def _control(scale, edit_scales, first, last, positions, visual_tokens):
    """An MRTControl from the control flags shared by `lmm generate` and `lmm eval`."""
    from mmtune.methods.mrt import MRTControl

    return MRTControl(
        scale=scale,
        edit_scales=edit_scales or {},
        first=first,
        last=last,
        positions=positions,
        visual_tokens=visual_tokens,
    )


_CONTROL_DOCS = {
    "scale": "multiplies every edit (0 = the base model, 1 = as trained).",
    "edit_scales": 'per-edit scales by name, e.g. \'{"projector": 0, "llm.28": 2}\'.',
    "first": "edit the first FIRST prompt tokens in the LLM (overrides the trained p).",
    "last": "edit the last LAST prompt tokens (overrides the trained s).",
    "positions": "explicit prompt-relative positions to edit (negative: from the end).",
    "visual_tokens": "visual tokens edited by the vision/projector edits (default all).",
}
"""The MRT control options that `lmm generate` and `lmm eval` share."""


@_documented(
    **_CONTROL_DOCS,
    prompt="text with one <image> per image (default with --item: its question).",
    image="image files, in the order of the <image> placeholders.",
    item="a VQA mini-benchmark item instead of files: BENCHMARK:SPLIT:INDEX (digits:test:0).",
    adapter="an `lmm tune` adapter directory (MRT, projector or LoRA); its base is found from it.",
    base="stage-1 directory, for the model without edits.",
    max_new_tokens="greedy tokens to generate.",
)
def lmm_generate(
    prompt: str | None = None,
    image: list[Path] | None = None,
    item: str | None = None,
    adapter: Path | None = None,
    base: Path | None = None,
    scale: float = 1.0,
    edit_scales: dict[str, float] | None = None,
    first: int | None = None,
    last: int | None = None,
    positions: list[int] | None = None,
    visual_tokens: list[int] | None = None,
    max_new_tokens: int = 16,
) -> None:
    """Answer a prompt about images with an MRT adapter (or a stage-1 base), under control."""
    from mmtune.data.vqa import VQA_BENCHMARKS
    from mmtune.recipes.instruct import answer, load_for_generation

    images: list = [str(p) for p in image or []]
    if item is not None:
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in VQA_BENCHMARKS or not parts[2].isdigit():
            raise ValueError(
                f"--item {item!r}: expected BENCHMARK:SPLIT:INDEX with BENCHMARK in "
                f"{sorted(VQA_BENCHMARKS)} (e.g. digits:test:0)"
            )
        data = VQA_BENCHMARKS[parts[0]]()
        if parts[1] not in data or int(parts[2]) >= len(data[parts[1]]):
            raise ValueError(f"--item {item!r}: no such split or index")
        chosen = data[parts[1]][int(parts[2])]
        images.append(chosen["image"])
        prompt = prompt or f"<image>\n{chosen['question']}"
        print(f"item {chosen['id']}: reference answer {chosen['answer']!r}")
    if prompt is None:
        raise ValueError("give --prompt (with one <image> per --image) or --item")
    model = load_for_generation(adapter, base)
    control = None
    if adapter is not None:
        control = _control(scale, edit_scales, first, last, positions, visual_tokens)
    print(answer(model, prompt, images, control=control, max_new_tokens=max_new_tokens))


@_documented(
    **_CONTROL_DOCS,
    adapter="an `lmm tune` adapter directory (MRT for the control options).",
    benchmark="digits or shapes.",
    num_samples="items of the benchmark (the split must match the one trained on to keep test "
    "images unseen: 300 for the README's table).",
    split="train, val or test.",
    output="also write the result (with predictions) to this JSON file.",
    reliance="also score the split with each item's image taken from another item (a seeded "
    "derangement): the drop is the reliance on the image.",
)
def lmm_eval(
    adapter: Path,
    benchmark: str = "shapes",
    num_samples: int = 400,
    split: str = "test",
    scale: float = 1.0,
    edit_scales: dict[str, float] | None = None,
    first: int | None = None,
    last: int | None = None,
    positions: list[int] | None = None,
    visual_tokens: list[int] | None = None,
    output: Path | None = None,
    reliance: bool = True,
) -> None:
    """Exact match of an MRT adapter on a VQA split under control (no training), and its
    reliance on the image (each item's image taken from another item; false: skipped)."""
    from mmtune.recipes.instruct import evaluate_adapter

    control = _control(scale, edit_scales, first, last, positions, visual_tokens)
    r = evaluate_adapter(
        adapter,
        benchmark,
        control=control,
        num_samples=num_samples,
        split=split,
        progress=_bars(),
        reliance=reliance,
    )
    if output is not None:
        with atomic_write(output) as tmp:
            tmp.write_text(json.dumps(r, indent=2) + "\n")
    print(f"{benchmark} {split} (n = {r['num_samples']}): exact match {r['exact_match']:.3f}")
    if "reliance" in r:
        print(_reliance_line(r["reliance"]))


def lmm_params(
    llm: str = "llama-2-7b",
    vision: str = "clip-vit-l-14-336",
    mrt: MRTConfig = MRTConfig(),  # noqa: B008
) -> None:
    """MRT's tunable share on a LLaVA-style model shape, counted on the meta device.

    Args:
        llm: a named LLM shape (llama-2-7b, llama-2-13b, smollm2-135m) or a model directory.
        vision: clip-vit-l-14-336 (LLaVA-1.5's tower) or mobilenet-v2 (the embedded one).
        mrt: the MRT config.
    """
    from mmtune.methods.mrt.params import mrt_share

    print(json.dumps(mrt_share(llm, vision, mrt), indent=2))


def version() -> None:
    """Print the mmtune version."""
    print(__version__)


def _error_line(e: BaseException) -> str:
    """``<file or field>: <what is wrong>`` for a user-caused error."""
    import errno

    import yaml

    if isinstance(e, OSError) and e.filename is not None:
        what = e.strerror or str(e)
        if e.errno == errno.ENOSPC:
            what = "no space left on device (free some space, or choose another output_dir)"
        return f"{e.filename}: {what}"
    if isinstance(e, yaml.YAMLError):
        return str(e).replace("\n", " ")
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    return str(e)


def _shipped_configs(argv: list[str]) -> list[str]:
    """Each ``--config PATH`` that names no file here, replaced by the config shipped with
    mmtune at that path (``demo/digits-ve.yaml`` or ``configs/demo/digits-ve.yaml``)."""
    from mmtune.utils.configs import resolve_config

    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out) and out[i + 1].endswith((".yaml", ".yml")):
            out[i + 1] = str(resolve_config(out[i + 1]))
        elif arg.startswith("--config=") and arg.endswith((".yaml", ".yml")):
            out[i] = "--config=" + str(resolve_config(arg.split("=", 1)[1]))
    return out


def _check_yaml_files(argv: list[str]) -> None:
    """Parse every ``--config FILE`` first, so a YAML error names the file and line."""
    import yaml

    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        p = Path(path)
        if not p.is_file():
            continue  # jsonargparse says so, or it is an inline YAML string
        try:
            yaml.safe_load(p.read_text(encoding="utf8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not UTF-8 text ({e.reason})") from e
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{p}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(p)
            problem = getattr(e, "problem", None) or str(e)
            raise ValueError(f"{where}: not valid YAML ({problem})") from e


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a user-caused error prints ``mmtune: error: <where>: <what>`` and exits 2.

    ``--debug`` (anywhere) or ``MMTUNE_DEBUG=1`` shows the traceback instead.
    """
    import os

    import yaml
    from safetensors import SafetensorError

    from mmtune.training.rundir import RunLockedError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MMTUNE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if len(argv) >= 2 and argv[0] == "train" and not argv[1].startswith("-"):
        argv.insert(1, "--config")  # `mmtune train CONFIG.yaml --key=value ...`
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docs in --help
    user_errors = (ValueError, OSError, yaml.YAMLError, SafetensorError, RunLockedError)
    try:
        argv = _shipped_configs(argv)
        _check_yaml_files(argv)
        auto_cli(
            {
                "demo": demo,
                "smoke": smoke,
                "params": params,
                "check_embedded": check_embedded,
                "data": {"inspect": data_inspect},
                "train": train,
                "eval": evaluate,
                "ceilings": ceilings,
                "predict": predict,
                "bench": bench,
                "compare": compare,
                "lmm": {
                    "stage1": lmm_stage1,
                    "tune": lmm_tune,
                    "table": lmm_table,
                    "generate": lmm_generate,
                    "eval": lmm_eval,
                    "params": lmm_params,
                },
                "version": version,
            },
            args=argv,
            as_positional=True,  # required arguments (a data path) are positional
        )
    except user_errors as e:  # bad input: one line, no traceback (unless --debug)
        if debug:
            raise
        print(f"mmtune: error: {_error_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
