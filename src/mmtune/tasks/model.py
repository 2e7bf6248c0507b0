"""The task model: frozen LLM + MiT + modality encoder + task head, and its inputs.

One :class:`TaskModel` serves the three tasks:

- classification: I = the frozen vision encoder's global vector; head = MLP([I; pooled text]);
- segmentation: I = global vector; head = decoder over the encoder's 3 feature maps + pooled text;
- sentiment: I = concat of trainable sequence encoders over the chosen frame modalities; head =
  linear on the pooled text. With no modality chosen, MiT is not injected (text only).

``method`` says how the modality reaches the LLM: ``mit`` (the vector I, infused), ``text``
(not at all: the frozen LLM reads the prompt only; a classification head then sees the text
vector alone, a segmentation decoder still reads the image maps it segments), or ``concat``
(projected tokens before the text, :mod:`mmtune.methods.concat`; PEFT adapters, if any, are
already in the LLM).

Frozen-encoder features are computed once per split (and cached on disk when asked). The hidden
states below the first infused layer do not depend on I, so with ``cache_lower_layers`` they
are computed once per distinct prompt, and every training step runs only the layers
from the first infused one up (:class:`LowerLayerCache`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmtune.data.prompts import DEFAULT_PROMPTS, PromptTemplate
from mmtune.encoders.sequence import MultiModalSequenceEncoder, SequenceEncoderConfig
from mmtune.heads import (
    SegmentationDecoderConfig,
    TaskToken,
    pool_last_token,
    position_ids_from_mask,
)
from mmtune.methods.concat import ConcatConfig, TokenProjector, image_tokens
from mmtune.methods.mit import MiTModel
from mmtune.models.partial import (
    PASSTHROUGH_FAMILIES,
    LowerLayerCache,
    layer_slice,
    states_entering,
)
from mmtune.tasks.base import get_task

__all__ = ["LowerLayerCache", "TaskConfig", "TaskModel"]


@dataclass
class TaskConfig:
    """What to learn and from which data."""

    data: str = "digits-ve"
    """A mini-benchmark (shapes-ref, digits-ve, movie-sentiment) or a path to real data."""
    format: str = "auto"
    """Loader of real data: refcoco, snli-ve, food101, mmsa, or auto."""
    data_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the loader or generator (e.g. num_samples, seed)."""
    val_split: str = "val"
    """Split used for validation during training (dev / valid on some data sets)."""
    test_split: str = "test"
    """Split scored at the end."""
    prompt: str | None = None
    """Prompt template; default: the task's entry in DEFAULT_PROMPTS."""
    max_length: int = 48
    """Longest prompt in tokens. A longer one keeps the template whole and the start of the
    user text: the text is cut at its end (one warning per run gives the count)."""
    modalities: list[str] = field(default_factory=lambda: ["audio", "vision"])
    """Sentiment only: frame modalities encoded into I (empty: text only, no infusion)."""
    bce_weight: float = 0.5
    """Segmentation: weight of BCE added to the DICE loss."""
    regression_loss: Literal["rmse", "l1"] = "rmse"
    """Sentiment: the paper's RMSE, or L1."""
    max_train_samples: int | None = None
    """Use only the first N training samples (quick runs)."""
    modality_norm: Literal["none", "standardize", "unit", "l2"] = "l2"
    """Image tasks: how the frozen image vector is scaled before it becomes MiT's I. ``l2``
    (the default, from the lever study in the README): each vector divided by its L2 norm;
    ``none``: as the encoder gives it (runs made before 0.3); ``standardize``: per dimension,
    minus the training split's mean, divided by its standard deviation (the statistics are
    saved with the run); ``unit``: that, divided by sqrt(d_I) (expected L2 norm 1)."""
    head_image: bool = True
    """Classification: the head reads [image vector; pooled text] (the paper's head). False:
    the pooled text only, so the image reaches the prediction through the LLM alone."""
    pooling: Literal["last", "task_token"] = "last"
    """Text vector: the last prompt token's hidden state (the paper's choice), or a learned
    task token (<SEG>/<CLS>, paper sec. 5.2) appended after the prompt and read back."""

    def __post_init__(self) -> None:
        if self.max_length < 4:
            raise ValueError("TaskConfig.max_length must be >= 4")
        bad = set(self.modalities) - {"audio", "vision"}
        if bad:
            raise ValueError(f"TaskConfig.modalities: unknown {sorted(bad)} (audio, vision)")
        if self.modality_norm not in ("none", "standardize", "unit", "l2"):
            raise ValueError(
                "TaskConfig.modality_norm must be one of none, standardize, unit, l2; got "
                f"{self.modality_norm!r}"
            )
        if self.pooling not in ("last", "task_token"):
            raise ValueError(
                f"TaskConfig.pooling must be 'last' or 'task_token', got {self.pooling!r}"
            )


class TaskModel(nn.Module):
    """Everything that turns a batch into predictions and a loss."""

    def __init__(
        self,
        task: str,
        llm: nn.Module,
        tokenizer: Any,
        config: TaskConfig,
        *,
        d_image: int = 0,
        level_channels: tuple[int, int, int] | None = None,
        num_classes: int = 0,
        frame_widths: dict[str, int] | None = None,
        sequence: SequenceEncoderConfig | None = None,
        decoder: SegmentationDecoderConfig | None = None,
        pixel_size: int | None = None,
        method: str = "mit",
        concat: ConcatConfig | None = None,
        modality_stats: tuple[list[float], list[float]] | None = None,
    ):
        super().__init__()
        if method not in ("mit", "text", "concat"):
            raise ValueError(f"TaskModel: unknown method {method!r} (mit, text, concat)")
        self.task, self.config, self.tokenizer = task, config, tokenizer
        self.method = method
        self.pixel_size = pixel_size  # segmentation: side of the encoder input, where masks live
        self.llm = llm  # a MiTModel, or the frozen base model for text-only runs
        base = llm.base_model if isinstance(llm, MiTModel) else llm
        self.decoder_backbone = base.get_decoder()
        d_text = base.config.hidden_size
        kind = self.kind = get_task(task)
        self.prompt = PromptTemplate(config.prompt or DEFAULT_PROMPTS[kind.prompt_name])
        sees_image = method != "text" and config.head_image  # the text baseline's head too
        self.head = kind.build_head(
            d_text,
            d_image=d_image if sees_image else 0,
            level_channels=level_channels,
            num_classes=num_classes,
            decoder=decoder,
        )
        self.frames: MultiModalSequenceEncoder | None = None
        if not kind.reads_image and config.modalities and method == "mit":  # frames -> I
            seq = sequence or SequenceEncoderConfig()
            widths = frame_widths or {}
            self.frames = MultiModalSequenceEncoder(
                {
                    m: SequenceEncoderConfig(**{**seq.__dict__, "d_in": widths[m]})
                    for m in config.modalities
                }
            )
        self.concat = concat or ConcatConfig()
        self.projector: TokenProjector | None = None
        if method == "concat":
            if not kind.reads_image:
                if not config.modalities:
                    raise ValueError("method concat on sentiment needs task.modalities")
                widths = {m: (frame_widths or {})[m] for m in config.modalities}
            else:
                if level_channels is None:
                    raise ValueError("method concat needs the image encoder's level_channels")
                widths = {"image": level_channels[-1]}
            self.projector = TokenProjector(widths, d_text, self.concat.projector)
        self.task_token: TaskToken | None = None
        if config.pooling == "task_token":  # starts at the mean input embedding: a typical scale
            self.task_token = TaskToken(d_text, base.get_input_embeddings().weight.mean(0))
        self.lower_cache: LowerLayerCache | None = None
        stats = [None, None]  # standardize I (TaskConfig.modality_norm): train mean, std
        if modality_stats is not None:
            stats = [torch.tensor(v, dtype=torch.float32) for v in modality_stats]
        self.register_buffer("modality_mean", stats[0], persistent=False)
        self.register_buffer("modality_std", stats[1], persistent=False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # the last real token sits at position T - 1
        tokenizer.truncation_side = "right"  # prompts are fitted first (fit_prompts)

    # ------------------------------------------------------------------ text
    def prompts(self, batch: dict[str, Any]) -> list[str]:
        return self.fit_prompts(batch[self.kind.text_field])[0]

    def fit_prompts(self, texts: list[str]) -> tuple[list[str], int]:
        """(prompts, how many were cut): each text in the template, within ``max_length``
        tokens. A too long prompt keeps the whole template and the start of its text: the
        text is cut at its end, so the statement's own first words always survive."""
        prompts = [self.prompt(**{self.prompt_field: t}) for t in texts]
        lengths = [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        cut = 0
        for i, n in enumerate(lengths):
            if n > self.config.max_length:
                prompts[i] = self._cut(str(texts[i]).strip(), n)
                cut += 1
        return prompts, cut

    def _cut(self, text: str, length: int) -> str:
        limit = self.config.max_length
        if getattr(self.tokenizer, "is_fast", False):
            ends = [
                e
                for _, e in self.tokenizer(
                    text, add_special_tokens=False, return_offsets_mapping=True
                )["offset_mapping"]
            ]
        else:  # character ends of growing token prefixes
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ends = [len(self.tokenizer.decode(ids[: k + 1])) for k in range(len(ids))]
        keep = len(ends) - (length - limit)
        for _ in range(8):  # merges at the cut can change the count by a token or two
            if keep <= 0:
                break
            prompt = self.prompt(**{self.prompt_field: text[: ends[keep - 1]]})
            n = len(self.tokenizer(prompt)["input_ids"])
            if n <= limit:
                return prompt
            keep -= n - limit
        template = len(self.tokenizer(self.prompt(**{self.prompt_field: ""}))["input_ids"])
        raise ValueError(
            f"task.max_length {limit} leaves no room for the text: the prompt template alone "
            f"takes {template} tokens; raise task.max_length"
        )

    @property
    def prompt_field(self) -> str:
        return next(iter(self.prompt.fields))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.config.max_length,
        )
        device = next(self.parameters()).device
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def modality(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The MiT modality vector I (B, d_I), or None when the LLM gets no vector."""
        if self.method != "mit":
            return None
        if not self.kind.reads_image:  # frames, encoded by the trainable sequence encoders
            if self.frames is None:
                return None
            frames = {m: batch[m] for m in self.config.modalities}
            lengths = {m: batch[f"{m}_length"] for m in self.config.modalities}
            vector = self.frames(frames, lengths)
            bad = ~torch.isfinite(vector).all(dim=-1)
            if bool(bad.any()):
                ids = [batch["id"][i] for i in bad.nonzero().flatten().tolist()]
                raise ValueError(
                    f"samples {ids[:10]}: the encoded {'/'.join(self.config.modalities)} frames "
                    "are NaN or infinite (frame values too large or non-finite in the data)"
                )
            return vector
        pooled = batch["pooled"]  # (B, d_I)
        if self.config.modality_norm == "l2":
            return F.normalize(pooled, dim=-1)
        if self.modality_mean is not None:  # per-dimension z-score (then / sqrt(d_I): unit)
            z = (pooled - self.modality_mean) / self.modality_std
            return z / pooled.shape[-1] ** 0.5 if self.config.modality_norm == "unit" else z
        return pooled

    def prefix_tokens(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenation: projected modality tokens (B, N, d) and their mask (B, N)."""
        assert self.projector is not None
        if not self.kind.reads_image:
            sources = {}
            for m in self.config.modalities:
                frames = batch[m]  # (B, L, C), zero-padded after each sample's length
                steps = torch.arange(frames.shape[1], device=frames.device)
                sources[m] = (frames, steps[None] < batch[f"{m}_length"].to(frames.device)[:, None])
        else:
            level = batch.get("token_level2", batch["level2"])  # reliance: another's image
            feats = image_tokens(level, self.concat.grid)  # (B, h*w, C)
            sources = {"image": (feats, feats.new_ones(feats.shape[:2]))}
        return self.projector(sources)

    def modality_fields(self) -> dict[str, str]:
        """Item fields that carry the modality into this model, as {target: source}.

        The reliance check fills each target from another sample's source field: MiT's I and
        the classification head's image vector (``pooled``), concatenated tokens (``level2``,
        read through ``token_level2`` in segmentation, whose decoder keeps its own image
        maps), or the frames. Empty when the model reads no modality (the text method).
        """
        if self.method == "text":
            return {}
        if not self.kind.reads_image:
            if self.frames is None and self.projector is None:
                return {}
            return {k: k for m in self.config.modalities for k in (m, f"{m}_length")}
        reads_pooled = self.method == "mit" or self.kind.head_reads_pooled
        fields = {"pooled": "pooled"} if reads_pooled else {}
        if self.method == "concat":  # a decoder keeps its own maps: it reads the tokens apart
            fields["token_level2" if self.kind.needs_feature_maps else "level2"] = "level2"
        return fields

    def _upper_layers_only(self) -> bool:
        base = self.llm.base_model if isinstance(self.llm, MiTModel) else self.llm
        return self.lower_cache is not None and base.config.model_type in PASSTHROUGH_FAMILIES

    @torch.no_grad()
    def fill_lower_cache(self, batches: Iterator[dict[str, Any]]) -> None:
        """Compute the states entering the first infused layer for every prompt not cached
        yet, batch by batch in the order given (as the forwards of :meth:`text_vector` would
        have kept them)."""
        cache = self.lower_cache
        assert cache is not None
        for batch in batches:
            prompts = self.prompts(batch)
            if cache.has(prompts):
                continue
            enc = self.tokenize(prompts)
            hidden = states_entering(  # (B, T, d), left-padded
                self.decoder_backbone,
                cache.first_layer,
                **enc,
                position_ids=position_ids_from_mask(enc["attention_mask"]),
            )
            cache.keep(prompts, hidden, enc["attention_mask"])

    def text_vector(self, batch: dict[str, Any], modality: torch.Tensor | None) -> torch.Tensor:
        """The pooled hidden state (B, d) of the (infused) prompts."""
        keep = None  # a hook that fills the lower-layer cache from this very forward
        prompts = self.prompts(batch)
        if self._upper_layers_only() and self.lower_cache.has(prompts):
            states = [self.lower_cache.states[p] for p in prompts]
            t = max(s.shape[0] for s in states)
            device = next(self.parameters()).device
            embeds = torch.zeros(len(states), t, states[0].shape[1], device=device)
            mask = torch.zeros(len(states), t, dtype=torch.long, device=device)
            for r, s in enumerate(states):
                embeds[r, t - s.shape[0] :], mask[r, t - s.shape[0] :] = s.to(device), 1
            inputs = {
                "inputs_embeds": embeds.to(self.decoder_backbone.dtype),
                "attention_mask": mask,
            }
            layers = layer_slice(self.decoder_backbone, self.lower_cache.first_layer - 1, None)
        else:
            inputs = self.tokenize(prompts)
            mask = inputs["attention_mask"]
            if self._upper_layers_only() and not (self.training and self._lower_dropout()):
                keep = self._keeper(prompts, mask)
            if self.task_token is not None or self.projector is not None:
                embeds = self.decoder_backbone.get_input_embeddings()(inputs["input_ids"])
                if self.task_token is not None:  # left padding: the token lands at position T
                    embeds, mask, _ = self.task_token.insert(embeds, mask)
                if self.projector is not None:  # [tokens ; pads ; text]: pads stay masked
                    tokens, token_mask = self.prefix_tokens(batch)
                    embeds = torch.cat([tokens.to(embeds.dtype), embeds], dim=1)
                    mask = torch.cat([token_mask.to(mask.device), mask], dim=1)
                inputs = {"inputs_embeds": embeds, "attention_mask": mask}
            layers = layer_slice(self.decoder_backbone, 0, None)
        pos = position_ids_from_mask(mask)
        try:
            with layers:
                if isinstance(self.llm, MiTModel) and modality is not None:
                    with self.llm.using_modality(modality):
                        hidden = self.decoder_backbone(**inputs, position_ids=pos)
                else:
                    hidden = self.decoder_backbone(**inputs, position_ids=pos)
        finally:
            if keep is not None:
                keep.remove()
        hidden = hidden.last_hidden_state
        return pool_last_token(hidden, mask).float()

    def _lower_dropout(self) -> bool:
        """Whether the frozen layers below the cached point drop out in training mode (their
        states then differ per pass: training keeps none, evaluation still does)."""
        assert self.lower_cache is not None
        below = list(self.decoder_backbone.layers)[: self.lower_cache.first_layer - 1]
        config = self.decoder_backbone.config
        rates = [getattr(config, k, 0.0) or 0.0 for k in ("attention_dropout", "hidden_dropout")]
        drops = [m.p for layer in below for m in layer.modules() if isinstance(m, nn.Dropout)]
        return any(float(r) > 0 for r in rates + drops)

    def _keeper(self, prompts: list[str], mask: torch.Tensor) -> Any:
        """A hook that stores the states entering the first infused layer of each prompt the
        cache lacks."""
        cache = self.lower_cache
        assert cache is not None

        def store(module: nn.Module, args: Any, out: Any) -> None:
            cache.keep(prompts, out[0] if isinstance(out, tuple) else out, mask)  # (B, T, d)

        return self.decoder_backbone.layers[cache.first_layer - 2].register_forward_hook(store)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        modality = self.modality(batch)
        text = self.text_vector(batch, modality)
        return self.kind.outputs(self.head, batch, text, self.config)


def collate(items: list[dict[str, Any]], task: str, pixel_size: int | None = None) -> dict:
    """Items (dicts from a split, with precomputed features) -> a batch of tensors."""
    batch: dict[str, Any] = {"id": [str(it["id"]) for it in items]}
    for key in ("text", "expression"):
        if key in items[0]:
            batch[key] = [it[key] for it in items]
    if "pooled" in items[0]:
        batch["pooled"] = torch.stack([it["pooled"] for it in items])
    for key in ("level0", "level1", "level2", "token_level2"):  # decoder maps, or tokens
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items])
    get_task(task).collate(items, batch, pixel_size)
    return batch
