"""The GPU check (cost issue): one JSON of the figures only a GPU can give, in under 5 minutes.

1. Latency of MiT inference at the paper's scale: a LLaMA-2-7B-shaped LLM (bf16, random
   weights) with MiT on its default layers, plus a CLIP ViT-L/14-336-shaped image encoder
   (random weights) that makes I; batch 1, 20 text tokens; the median of ``--repeats`` timed
   runs after warm-up, image encoding included. The paper reports 69 ms (7B, RTX 3090, fp16).
2. Beside it, concatenation: the same encoder's 576 patch tokens through a LLaVA-1.5 MLP
   projector, placed before the 20 text tokens of the frozen LLM.
3. The real-user training case: one MiT training step of the 7B-shaped LLM at batch 8 (as is,
   with activation checkpointing, on a 4-bit NF4 base) beside a concatenation-576 step:
   median step time, peak memory, whether gradients reach every infusion tensor.
4. A 2-process DDP smoke run of ``mmtune train`` (1 epoch, digits-ve, accelerate via
   ``torch.distributed.run``): on 2 GPUs where there are two, else on the CPU with gloo (the
   JSON says which).

``--tiny`` shrinks every shape (a 2-layer LLaMA, a 2-layer CLIP) so that the test suite runs
the very same code on the CPU; its figures mean nothing. Without CUDA the full shapes run on
the CPU (slowly) and the JSON says ``"device": "cpu"``.

    bash benchmarks/gpu_check.sh > benchmarks/results/gpu-check.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

PAPER_MS = 69.0


def _clip_config(tiny: bool):
    from transformers import CLIPVisionConfig

    if tiny:
        return CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=56, patch_size=14, projection_dim=16,
        )  # fmt: skip
    return CLIPVisionConfig(  # ViT-L/14 at 336 px: 24 x 24 = 576 patches, 768-d image_embeds
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )  # fmt: skip


def _llm_config(tiny: bool):
    from mmtune.models.shapes import shape_config

    if tiny:
        return shape_config(
            "llama-2-7b", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
        )  # fmt: skip
    return shape_config("llama-2-7b")


def _time(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def latency(tiny: bool, warmup: int, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM, CLIPVisionModelWithProjection

    from mmtune.methods.mit import MiTConfig, inject_mit

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with device:  # random weights made on the device itself (seconds, not minutes, for 7B)
        vision_cfg = _clip_config(tiny)
        vision = CLIPVisionModelWithProjection(vision_cfg).to(dtype).eval()
        llm_cfg = _llm_config(tiny)
        llm_cfg._attn_implementation = "sdpa"
        llm = AutoModelForCausalLM.from_config(llm_cfg, dtype=dtype).eval()
        d = llm_cfg.hidden_size
        projector = nn.Sequential(
            nn.Linear(vision_cfg.hidden_size, d), nn.GELU(), nn.Linear(d, d)
        ).to(dtype)
    build_s = time.perf_counter() - t0
    llm.requires_grad_(False)
    mit = inject_mit(llm, MiTConfig(d_modality=vision_cfg.projection_dim))
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, vision_cfg.image_size, vision_cfg.image_size, generator=g)
    pixels = pixels.to(device, dtype)
    text = torch.randint(0, llm_cfg.vocab_size, (1, 20), generator=g).to(device)
    embed = llm.get_input_embeddings()

    @torch.no_grad()
    def run_mit():
        image = vision(pixel_values=pixels).image_embeds  # (1, 768)
        return mit(input_ids=text, modality=image).logits

    @torch.no_grad()
    def run_concat():
        patches = vision(pixel_values=pixels).last_hidden_state[:, 1:]  # (1, 576, 1024)
        tokens = projector(patches)  # (1, 576, d)
        embeds = torch.cat([tokens, embed(text)], dim=1)  # (1, 596, d)
        with mit.disable_adapter():
            return llm(inputs_embeds=embeds).logits

    @torch.no_grad()
    def run_frozen():
        with mit.disable_adapter():
            return llm(input_ids=text).logits

    out = {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "shapes": "tiny (test of the script)" if tiny else "LLaMA-2-7B + CLIP ViT-L/14-336",
        "infused_layers": mit.layer_ids,
        "image_tokens_concat": int(patches_count(vision_cfg)),
        "text_tokens": 20,
        "build_seconds": build_s,
        "mit_ms": _time(run_mit, device, warmup, repeats),
        "frozen_text_only_ms": _time(run_frozen, device, warmup, repeats),
        "concat_576_ms": _time(run_concat, device, warmup, repeats),
        "paper_mit_ms": PAPER_MS,
    }
    out["mit_over_paper"] = out["mit_ms"] / PAPER_MS
    out["concat_over_mit"] = out["concat_576_ms"] / out["mit_ms"]
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _to_4bit(llm: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every linear layer of the decoder layers by bitsandbytes' NF4 Linear4bit, in
    place, one at a time (peak memory: the bf16 model); returns how many were replaced."""
    import bitsandbytes as bnb

    count = 0
    for layer in llm.model.layers:
        for name, lin in list(layer.named_modules()):
            if not isinstance(lin, nn.Linear):
                continue
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            device = lin.weight.device
            q = bnb.nn.Linear4bit(
                lin.in_features, lin.out_features, bias=lin.bias is not None,
                compute_dtype=compute_dtype, quant_type="nf4", device="cpu",
            )  # fmt: skip
            q.weight = bnb.nn.Params4bit(
                lin.weight.data.cpu(), requires_grad=False, quant_type="nf4"
            )
            setattr(parent, name.rsplit(".", 1)[-1], q.to(device))
            del lin
            count += 1
    return count


def training_step(tiny: bool, warmup: int, repeats: int, batch: int = 8, text: int = 32) -> dict:
    """The real-user case: one MiT training step (forward, backward, Adam) of a LLaMA-2-7B-
    shaped frozen LLM at batch 8, as is, with activation checkpointing, and on a 4-bit (NF4)
    base, beside a step of concatenating 576 projected image tokens; median step time and
    peak GPU memory of each (bf16 base, fp32 infusion)."""
    from importlib.util import find_spec

    from transformers import AutoModelForCausalLM

    from mmtune.methods.mit import MiTConfig, inject_mit
    from mmtune.models.llm import enable_activation_checkpointing

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    d_i, tokens = 768 if not tiny else 16, 576 if not tiny else 16
    g = torch.Generator().manual_seed(0)
    out: dict = {"batch": batch, "text_tokens": text, "device": device.type}

    def build(quantized: bool = False):
        torch.manual_seed(0)
        with device:
            cfg = _llm_config(tiny)
            cfg._attn_implementation = "sdpa"
            llm = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        llm.requires_grad_(False)
        replaced = _to_4bit(llm, torch.bfloat16 if device.type == "cuda" else dtype) if (
            quantized
        ) else 0  # fmt: skip
        return llm, cfg, replaced

    def measure(llm, cfg, step) -> dict:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ms = _time(step, device, warmup, repeats)
        row = {"step_ms": ms}
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return row

    def mit_step(llm, cfg):
        mit = inject_mit(llm, MiTConfig(d_modality=d_i))
        mit.train()
        opt = torch.optim.Adam(mit.infusion.parameters(), lr=1e-4)
        ids = torch.randint(0, cfg.vocab_size, (batch, text), generator=g).to(device)
        image = torch.randn(batch, d_i, generator=g).to(device, dtype)

        def step():
            loss = mit(input_ids=ids, labels=ids, modality=image).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return mit, step

    def concat_step(llm, cfg):
        d, width = cfg.hidden_size, 1024 if not tiny else 32
        projector = nn.Sequential(nn.Linear(width, d), nn.GELU(), nn.Linear(d, d)).to(device)
        opt = torch.optim.Adam(projector.parameters(), lr=1e-4)
        patches = torch.randn(batch, tokens, width, generator=g).to(device)
        ids = torch.randint(0, cfg.vocab_size, (batch, text), generator=g).to(device)
        labels = torch.cat([torch.full((batch, tokens), -100, device=device), ids], dim=1)
        embed = llm.get_input_embeddings()

        def step():
            embeds = torch.cat([projector(patches).to(dtype), embed(ids)], dim=1)
            loss = llm(inputs_embeds=embeds, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    def variant(name: str) -> dict:  # its model is freed on return
        llm, cfg, replaced = build(quantized=name == "mit_4bit")
        if name == "concat_576":
            return {"image_tokens": tokens, **measure(llm, cfg, concat_step(llm, cfg))}
        if name == "mit_checkpointing":
            enable_activation_checkpointing(llm)
        mit, step = mit_step(llm, cfg)
        row = measure(llm, cfg, step)
        grads = [p.grad for p in mit.infusion.parameters()]
        row["gradients_reach_every_infusion_tensor"] = all(
            x is not None and bool(torch.isfinite(x).all()) for x in grads
        )
        if name == "mit_4bit":
            row["linear_layers_4bit"] = replaced
        return row

    for name in ("mit", "mit_checkpointing", "mit_4bit", "concat_576"):
        if name == "mit_4bit" and find_spec("bitsandbytes") is None:
            out[name] = {"skipped": "bitsandbytes is not installed (pip install 'mmtune[quant]')"}
            continue
        out[name] = variant(name)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "peak_memory_gib" in out["mit"]:
        out["checkpointing_memory_ratio"] = (
            out["mit_checkpointing"]["peak_memory_gib"] / out["mit"]["peak_memory_gib"]
        )
        if "peak_memory_gib" in out["mit_4bit"]:
            out["4bit_memory_ratio"] = (
                out["mit_4bit"]["peak_memory_gib"] / out["mit"]["peak_memory_gib"]
            )
    out["concat_over_mit_step"] = out["concat_576"]["step_ms"] / out["mit"]["step_ms"]
    return out


def patches_count(cfg) -> int:
    return (cfg.image_size // cfg.patch_size) ** 2


def ddp_smoke(llm: str, vision: str, samples: int) -> dict:
    gpus = torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "ddp.yaml"
        config.write_text(
            f"task: {{data: digits-ve, data_options: {{num_samples: {samples}}}}}\n"
            f"model: {{llm: {llm}, vision: {vision}}}\n"
            "optim: {epochs: 1, batch_size: 4, lr: 1.0e-3}\n"
            f"output_dir: {tmp}/run\nplots: false\n"
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if gpus < 2:
            env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU: one GPU cannot hold 2 NCCL ranks
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--standalone", "-m", "mmtune.cli", "train", str(config),
            "--quiet", "true",
        ]  # fmt: skip
        t0 = time.perf_counter()  # timeout: a hang guard only
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        seconds = time.perf_counter() - t0
        out = {
            "backend": "nccl on 2 GPUs" if gpus >= 2 else "gloo on the CPU",
            "returncode": run.returncode,
            "seconds": seconds,
        }
        results = Path(tmp) / "run" / "results.json"
        if run.returncode == 0 and results.is_file():
            r = json.loads(results.read_text())
            out.update(processes=r["processes"], metrics=r["metrics"])
        else:
            out["stderr_tail"] = run.stderr[-1500:]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes: the test suite's CPU run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--ddp-llm", default="smollm2-135m", help="LLM of the DDP smoke run")
    p.add_argument("--ddp-vision", default="mobilenet-v2", help="encoder of the DDP smoke run")
    p.add_argument("--ddp-samples", type=int, default=80)
    args = p.parse_args()
    t0 = time.perf_counter()
    out = {"latency": latency(args.tiny, args.warmup, args.repeats)}
    out["training_step"] = training_step(args.tiny, min(args.warmup, 2), min(args.repeats, 5))
    out["ddp"] = ddp_smoke(args.ddp_llm, args.ddp_vision, args.ddp_samples)
    out["seconds"] = time.perf_counter() - t0
    out["torch"] = torch.__version__
    print(json.dumps(out, indent=2))
    sys.exit(0 if out["ddp"]["returncode"] == 0 else 1)


if __name__ == "__main__":
    main()
