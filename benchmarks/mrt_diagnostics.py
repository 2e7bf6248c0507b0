"""Why MRT's VQA loss sits at the constant-answer level: two measurements on a stage-1 base.

    python benchmarks/mrt_diagnostics.py benchmarks/results/vqa-converged/stage1 \
        --out benchmarks/results/vqa-converged/levers/diagnostics.json

1. The norm of the LLM's hidden state at each position MRT edits by default (the first p and
   the last s prompt tokens), per edited layer, on a batch of digits train items; and where the
   visual tokens sit in the prompt (an edit before them cannot see the image: causal attention).
2. Whether the frozen base reads the image on its own: teacher-forced on the stage-1 caption
   prompt, the share of test images whose digit (the number word after "A handwritten digit")
   is the base's most likely of the ten number words.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mmtune.data.vqa import _NUMBERS, VQA_BENCHMARKS
from mmtune.methods.mrt import MRTConfig, MRTModel
from mmtune.methods.mrt.config import _llm_layer_indices
from mmtune.models.architectures import get_architecture, resolve
from mmtune.models.lmm import load_lmm
from mmtune.recipes.instruct import CAPTION_PROMPT, _pixels, _prompt


def edited_norms(base, items: list[dict], pixels: list[torch.Tensor]) -> dict:
    model = MRTModel(base, MRTConfig())
    batch = base.batch(
        [_prompt(it) for it in items],
        [None] * len(items),
        answers=[it["answer"] for it in items],
        pixel_values=pixels,
    )
    layers = resolve(base.llm, get_architecture(base.llm.config.model_type).layers)
    norms: dict[int, torch.Tensor] = {}

    def keep(j: int):
        def hook(_m, _inp, out):
            h = out[0] if isinstance(out, tuple) else out  # (B, T, d)
            norms[j] = h.norm(dim=-1).detach()  # (B, T)

        return hook

    edited_layers = _llm_layer_indices(model.mrt_config, len(layers))
    hooks = [layers[j].register_forward_hook(keep(j)) for j in edited_layers]
    with torch.no_grad():
        model.loss(batch)
    for h in hooks:
        h.remove()
    start, end = int(batch.prompt_start[0]), int(batch.prompt_end[0])
    edited = model.prompt_positions(batch)[0].nonzero().flatten()
    visual = batch.image_mask[0].nonzero().flatten()
    tokens = base.tokenizer.convert_ids_to_tokens(
        [max(int(i), 0) for i in batch.input_ids[0, start:end]]
    )
    return {
        "prompt_tokens": end - start,
        "edited_positions": [int(p) - start for p in edited],
        "edited_tokens": [tokens[int(p) - start] for p in edited],
        "visual_positions": [int(visual[0]) - start, int(visual[-1]) - start],
        "layers": {
            str(j): {
                "edited_norms_mean_over_batch": [round(float(n[:, p].mean()), 1) for p in edited],
                "median_prompt_norm": round(float(n[:, start:end].median()), 1),
            }
            for j, n in sorted(norms.items())
        },
    }


def caption_read(base, items: list[dict], pixels: list[torch.Tensor]) -> float:
    words = [base.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in _NUMBERS]
    hits = 0
    with torch.no_grad():
        for s in range(0, len(items), 16):
            chunk = items[s : s + 16]
            batch = base.batch(
                [CAPTION_PROMPT] * len(chunk),
                [None] * len(chunk),
                answers=["A handwritten digit"] * len(chunk),
                pixel_values=pixels[s : s + 16],
            )
            logits = base(batch)  # (B, T, V)
            for i, it in enumerate(chunk):
                answer = (batch.labels[i] != -100).nonzero().flatten()
                at = int(answer[-2])  # "digit": its logits predict the number word
                hits += int(logits[i, at, words].argmax()) == int(it["answer"])
    return hits / len(items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_lmm(args.base).eval()
    data = VQA_BENCHMARKS["digits"](num_samples=1797)
    train, test = data["train"][:8], data["test"]
    result = {
        "base": str(args.base),
        "norms": edited_norms(base, train, _pixels(base, train)),
        "caption_digit_read_test": caption_read(base, test, _pixels(base, test)),
        "test_images": len(test),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    n = result["norms"]
    print(f"edited tokens {n['edited_tokens']} at {n['edited_positions']}; "
          f"visual tokens at {n['visual_positions']}")  # fmt: skip
    for j, row in n["layers"].items():
        norms, median = row["edited_norms_mean_over_batch"], row["median_prompt_norm"]
        print(f"layer {j}: {norms} (median {median})")
    print(f"caption prefix reads the digit on {result['caption_digit_read_test']:.3f} of "
          f"{len(test)} test images")  # fmt: skip


if __name__ == "__main__":
    main()
