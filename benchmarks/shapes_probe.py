"""Decoder probe for shapes-ref (modality issue): can the segmentation decoder, on its own,
segment the *named* object, and how much data does it need?

It trains only the segmentation decoder (``mmtune.recipes.ceilings.decoder_probe``, the function
behind the ceilings' ``decoder_probe`` row) on the frozen encoder's feature maps and a fixed vector
per expression, so an epoch takes seconds instead of minutes:

- ``--text llm``: the frozen LLM's pooled prompt vector (what the text method's decoder sees;
  MiT adds the infusion to it);
- ``--text onehot``: a one-hot code of the expression string (perfect, trivial text reading).

The scores use the project's metric conventions (sigmoid > 0.5 at the original size; oIoU,
mIoU, prec@0.5). Writes one JSON with a curve per epoch (val and test).

    python benchmarks/shapes_probe.py --samples 900 --expressions 1 --epochs 30 \
        --output benchmarks/results/levers/shapes-ref/probe-900x1.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mmtune.recipes.ceilings import decoder_probe
from mmtune.recipes.train import ModelConfig, TrainConfig
from mmtune.tasks.model import TaskConfig
from mmtune.training.build import build


def text_vectors(model, texts: list[str], kind: str) -> dict[str, torch.Tensor]:
    distinct = sorted(set(texts))
    if kind == "onehot":
        eye = torch.eye(len(distinct))
        return {t: eye[i] for i, t in enumerate(distinct)}
    with torch.no_grad():
        out = {}
        for start in range(0, len(distinct), 32):
            chunk = distinct[start : start + 32]
            vec = model.text_vector({"expression": chunk, "id": chunk}, None)
            out.update({t: v for t, v in zip(chunk, vec, strict=True)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=900, help="scenes (shapes_ref num_samples)")
    p.add_argument("--expressions", type=int, default=1, help="expressions per training scene")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--text", choices=("llm", "onehot"), default="llm")
    p.add_argument("--bce-weight", type=float, default=0.5)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    cfg = TrainConfig(
        task=TaskConfig(
            data="shapes-ref",
            data_options={"num_samples": args.samples, "expressions_per_image": args.expressions},
            max_length=32,
        ),
        model=ModelConfig(llm="smollm2-135m", vision="mobilenet-v2", image_size=args.image_size),
        method="text",
        output_dir=str(args.output.parent / "unused"),
    )
    start = time.perf_counter()
    model, splits, _data, info = build(cfg)
    texts = [it["expression"] for ds in splits.values() for it in ds.items]
    vectors = text_vectors(model, texts, args.text)
    d_text = next(iter(vectors.values())).numel()
    pixel_size = info["model"]["pixel_size"]
    curve = []
    setup_s = time.perf_counter() - start
    last = [time.perf_counter()]

    def on_epoch(epoch: int, loss: float, scores: dict[str, dict[str, float]]) -> None:
        keep = ("oIoU", "mIoU", "prec@0.5")
        row = {"epoch": epoch, "train_loss": loss}
        row.update({split: {k: m[k] for k in keep} for split, m in scores.items()})
        row["seconds"] = time.perf_counter() - last[0]
        last[0] = time.perf_counter()
        curve.append(row)
        print(json.dumps(row), flush=True)

    decoder_probe(
        splits["train"],
        {"val": splits["val"], "test": splits["test"]},
        lambda expressions: torch.stack([vectors[e] for e in expressions]),
        d_text,
        pixel_size,
        args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        bce_weight=args.bce_weight,
        seed=args.seed,
        on_epoch=on_epoch,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "probe": "SegmentationDecoder alone on frozen MobileNetV2 maps + a fixed text vector",
        "sees": {"llm": "the frozen SmolLM2 pooled prompt vector", "onehot": "expression id"}[
            args.text
        ],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sizes": {k: len(v) for k, v in splits.items()},
        "distinct_expressions": len(vectors),
        "setup_seconds": setup_s,
        "curve": curve,
        "final": curve[-1],
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
