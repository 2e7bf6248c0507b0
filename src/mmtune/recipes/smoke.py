"""The smallest honest end-to-end run of MiT (``mmtune smoke``): seconds, no pretrained model.

What it does, all in-process and in seconds on a CPU:

1. builds a tiny LLaMA-shaped model with random weights (no download; not a pretrained LLM);
2. injects MiT (``gated`` form) and checks that at init its logits equal the frozen model's;
3. makes a synthetic task whose answer is only in the modality vector: every sample has the same
   prompt, and the label is which of ``num_classes`` Gaussian clusters its vector I comes from;
4. trains a linear head on the last token's hidden state twice, with the same steps and seed:
   text only (adapter disabled: chance level is the best it can do) and with MiT, beside a
   linear classifier on I itself (the ceiling: the clusters overlap, so it is below 100%);
5. saves the adapter, reloads it onto a fresh copy of the base model and checks equal outputs.

It shows that information reaches the frozen LLM through the infusion hooks, and that the
plumbing (freezing, hooks, save/load) works. It says nothing about accuracy on real data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from mmtune.methods.mit import MiTConfig, MiTModel, inject_mit

__all__ = ["SmokeDemoConfig", "run_smoke_demo"]


@dataclass
class SmokeDemoConfig:
    """Settings of the synthetic smoke demo."""

    steps: int = 150
    """Optimizer steps for each of the two runs."""
    batch_size: int = 32
    """Samples per step."""
    num_classes: int = 4
    """Clusters of modality vectors; chance accuracy is 1 / num_classes."""
    d_modality: int = 32
    """Width of the synthetic modality vectors."""
    lr: float = 1e-2
    """Adam learning rate for the infusion parameters and the head."""
    seed: int = 0
    """Seed of the model, the data and the training order."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "d_modality"):
            if getattr(self, name) < 1:
                raise ValueError(f"SmokeDemoConfig.{name} must be >= 1")
        if self.num_classes < 2:
            raise ValueError("SmokeDemoConfig.num_classes must be >= 2")


def _tiny_llm(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _clusters(cfg: SmokeDemoConfig, n: int, g: torch.Generator, centres: torch.Tensor):
    labels = torch.randint(0, cfg.num_classes, (n,), generator=g)
    vectors = centres[labels] + torch.randn(n, cfg.d_modality, generator=g)
    return vectors, labels


def _train_and_score(
    mit: MiTModel,
    use_modality: bool,
    cfg: SmokeDemoConfig,
    prompt: torch.Tensor,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    progress: Callable[[str, int, float], None] | None,
) -> dict[str, float]:
    torch.manual_seed(cfg.seed + 1)
    head = nn.Linear(mit.base_model.config.hidden_size, cfg.num_classes)
    params = list(head.parameters())
    if use_modality:
        params += [p for p in mit.infusion.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    name = "mit" if use_modality else "text-only"

    def logits(vectors: torch.Tensor) -> torch.Tensor:
        ids = prompt.expand(vectors.shape[0], -1)
        if use_modality:
            out = mit(input_ids=ids, modality=vectors, output_hidden_states=True)
        else:
            with mit.disable_adapter():
                out = mit(input_ids=ids, output_hidden_states=True)
        return head(out.hidden_states[-1][:, -1])  # last token's final hidden state

    train_x, train_y = data["train"]
    g = torch.Generator().manual_seed(cfg.seed + 2)
    mit.train()
    loss = torch.tensor(float("nan"))
    for step in range(cfg.steps):
        idx = torch.randint(0, train_x.shape[0], (cfg.batch_size,), generator=g)
        loss = nn.functional.cross_entropy(logits(train_x[idx]), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(name, step, loss.item())
    mit.eval()
    test_x, test_y = data["test"]
    with torch.no_grad():
        accuracy = (logits(test_x).argmax(-1) == test_y).float().mean().item()
    return {"final_train_loss": loss.item(), "test_accuracy": accuracy}


def run_smoke_demo(
    cfg: SmokeDemoConfig,
    out_dir: str | Path | None = None,
    progress: Callable[[str, int, float], None] | None = None,
) -> dict[str, Any]:
    """Run the smoke demo; returns a JSON-ready result dict (and saves the adapter to out_dir)."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed)
    centres = 0.6 * torch.randn(cfg.num_classes, cfg.d_modality, generator=g)
    data = {
        "train": _clusters(cfg, 1024, g, centres),
        "test": _clusters(cfg, 512, g, centres),
    }
    prompt = torch.randint(3, 128, (1, 8), generator=g)  # the same prompt for every sample

    base = _tiny_llm(cfg.seed)
    mit_config = MiTConfig(d_modality=cfg.d_modality, layers="paper", form="gated")
    with torch.no_grad():
        frozen_logits = base(input_ids=prompt.expand(4, -1)).logits
    mit = inject_mit(base, mit_config)
    with torch.no_grad():
        init_logits = mit(input_ids=prompt.expand(4, -1), modality=data["test"][0][:4]).logits
    identity_diff = (init_logits - frozen_logits).abs().max().item()
    report = mit.trainable_parameters()

    text_only = _train_and_score(mit, False, cfg, prompt, data, progress)
    infused = _train_and_score(mit, True, cfg, prompt, data, progress)

    # The ceiling: a linear classifier trained on I itself, same steps and batches.
    torch.manual_seed(cfg.seed + 1)
    probe = nn.Linear(cfg.d_modality, cfg.num_classes)
    opt = torch.optim.Adam(probe.parameters(), lr=cfg.lr)
    gp = torch.Generator().manual_seed(cfg.seed + 2)
    for _ in range(cfg.steps):
        idx = torch.randint(0, data["train"][0].shape[0], (cfg.batch_size,), generator=gp)
        loss = nn.functional.cross_entropy(probe(data["train"][0][idx]), data["train"][1][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        probe_acc = (probe(data["test"][0]).argmax(-1) == data["test"][1]).float().mean().item()

    reload_diff = None
    if out_dir is not None:
        adapter_dir = Path(out_dir) / "adapter"
        mit.save_pretrained(adapter_dir)
        reloaded = MiTModel.from_pretrained(_tiny_llm(cfg.seed), adapter_dir)
        x = data["test"][0][:8]
        ids = prompt.expand(8, -1)
        with torch.no_grad():
            reload_diff = (
                (reloaded(input_ids=ids, modality=x).logits - mit(input_ids=ids, modality=x).logits)
                .abs()
                .max()
                .item()
            )

    return {
        "what": "synthetic smoke demo: tiny random LLaMA, label carried only by the modality",
        "config": asdict(cfg),
        "mit_config": mit_config.to_dict(),
        "infused_layers": mit.layer_ids,
        "identity_at_init_max_abs_diff": identity_diff,
        "parameters": {
            "trainable": report.trainable,
            "total": report.total,
            "share": report.share,
        },
        "chance_accuracy": 1.0 / cfg.num_classes,
        "text_only": text_only,
        "mit": infused,
        "linear_probe_on_modality": {"test_accuracy": probe_acc},
        "reload_max_abs_diff": reload_diff,
        "wall_time_s": time.perf_counter() - start,
    }
