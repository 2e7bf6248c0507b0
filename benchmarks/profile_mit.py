"""Where MiT's forward overhead goes (cost issue): torch.profiler on a LLaMA-2-7B-shaped model.

Builds the named shape with random weights and ``--layers`` decoder layers (the default MiT
layer rule scaled to that depth), runs the frozen forward and the MiT forward ``--repeats``
times each under ``torch.profiler`` (CPU), and writes the top operators of both by self CPU
time, with their call counts, to one JSON (and prints the MiT table).

    python benchmarks/profile_mit.py --layers 1 --output benchmarks/results/profile-7b-1layer.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mmtune.recipes.bench import BenchConfig, _Bench, load_bench_llm


def _top(prof, n: int) -> list[dict]:
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
            "share": e.self_cpu_time_total / total,
        }
        for e in rows[:n]
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", default="llama-2-7b")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(llm=args.llm, num_layers=args.layers, batch_size=args.batch_size)
    bench = _Bench("mit", load_bench_llm(cfg), cfg).eval()
    g = torch.Generator().manual_seed(0)
    vocab = bench.decoder.get_input_embeddings().num_embeddings
    text = torch.randint(0, vocab, (args.batch_size, args.tokens), generator=g)
    vector = torch.randn(args.batch_size, cfg.d_image, generator=g)
    embeds = bench.inputs(text, text.new_zeros(args.batch_size, 0, cfg.d_image), vector)
    out = {"llm": args.llm, "layers": args.layers, "infused": bench.llm.layer_ids}
    with torch.no_grad():
        bench(embeds, vector)  # warm-up
        for name, frozen in (("frozen", True), ("mit", False)):
            ctx = bench.llm.disable_adapter() if frozen else contextlib.nullcontext()
            with ctx, profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.repeats):
                    bench(embeds, vector)
            out[name] = _top(prof, args.top)
            out[f"{name}_self_cpu_ms"] = (
                sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3 / args.repeats
            )
    out["mit_over_frozen_cpu"] = out["mit_self_cpu_ms"] / out["frozen_self_cpu_ms"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    for row in out["mit"]:
        print(
            f"{row['op']:<40} {row['calls']:>6} {row['self_cpu_ms']:>10.1f} ms {row['share']:6.1%}"
        )
    print(
        json.dumps(
            {
                k: out[k]
                for k in ("infused", "frozen_self_cpu_ms", "mit_self_cpu_ms", "mit_over_frozen_cpu")
            }
        )
    )


if __name__ == "__main__":
    main()
