"""Pooling the LLM's output into one vector per sample (paper sec. 3.2 and 5.2).

- last-token pooling: the final hidden state of the last non-padding token, whatever the
  padding side;
- task token: a learned embedding (``<SEG>``, ``<CLS>``) inserted right after each prompt's last
  real token, read back at that position. It is a new trainable row, not a new vocabulary entry,
  so the frozen embedding matrix stays untouched.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TaskToken", "last_token_index", "pool_last_token", "position_ids_from_mask"]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask of 0/1 -> (B,) index of the last 1 in each row (left or right padding)."""
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be (B, T); got {tuple(attention_mask.shape)}")
    if bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError("a row of attention_mask has no real token")
    steps = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (steps + 1)).argmax(-1)  # ties impossible: steps increase


def pool_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """hidden (B, T, D) -> (B, D) at each row's last real token."""
    if attention_mask is None:
        return hidden[:, -1]
    idx = last_token_index(attention_mask)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... over the real tokens of each row (what generate() uses)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class TaskToken(nn.Module):
    """A learned task-token embedding inserted after each row's last real token."""

    def __init__(self, d_model: int, init: torch.Tensor | None = None):
        super().__init__()
        self.embedding = nn.Parameter(
            init.detach().clone().float() if init is not None else torch.randn(d_model) * 0.02
        )
        if self.embedding.shape != (d_model,):
            raise ValueError(f"TaskToken init must be ({d_model},); got {tuple(init.shape)}")

    def insert(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, D), (B, T) -> embeds (B, T+1, D), mask (B, T+1), index (B,) of the token."""
        b, t, d = inputs_embeds.shape
        last = last_token_index(attention_mask)  # (B,)
        out_pos = torch.arange(t + 1, device=inputs_embeds.device)[None].expand(b, -1)
        # output position p copies source p (p <= last), is the task token (p == last + 1),
        # or copies source p - 1 (p > last + 1)
        src = torch.where(out_pos > last[:, None], out_pos - 1, out_pos).clamp(max=t - 1)
        embeds = inputs_embeds.gather(1, src[..., None].expand(b, t + 1, d))  # (B, T+1, D)
        mask = attention_mask.gather(1, src)
        is_task = out_pos == (last + 1)[:, None]
        token = self.embedding.to(inputs_embeds.dtype).expand(b, t + 1, d)
        embeds = torch.where(is_task[..., None], token, embeds)
        mask = torch.where(is_task, torch.ones_like(mask), mask)
        return embeds, mask, last + 1
