"""A LLaVA-style large multimodal model built from a frozen causal LM and a frozen vision encoder.

    image --(frozen encoder)--> (N, C) visual tokens --(projector)--> (N, d) --+
    prompt "...<image>...?" --(tokenizer)--> ids with N placeholder slots -----+--> frozen LLM

(Liu et al., LLaVA-1.5, 2023.) Each ``<image>`` in a prompt is replaced by the N visual tokens of
the matching image, so a sample may hold any number of images. Batches are left-padded and carry
every sample's real spans (``prompt_start`` / ``prompt_end`` / ``image_mask``), from which
methods such as MRT pick their positions; nothing depends on fixed offsets.

The embedded default is SmolLM2-135M-Instruct with ImageNet MobileNetV2: its last 7 x 7 map
(1280 channels) gives 49 visual tokens. A Hugging Face ViT (CLIP, SigLIP) gives its patch tokens
from ``feature_layer`` (LLaVA takes the penultimate layer and drops CLS).

Stage 1 (``mmtune lmm stage1``) trains only the projector on captions; its output directory
(``lmm_config.json`` + the projector tensors) is what later stages load as the base model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmtune.encoders.images import ImageLike
from mmtune.encoders.vision import VisionEncoder, load_vision_encoder
from mmtune.utils.adapter_file import (
    load_adapter_tensors,
    read_adapter,
    write_adapter,
)

__all__ = [
    "IMAGE_TOKEN",
    "LMMBatch",
    "LMMConfig",
    "LlavaStyleModel",
    "VisualTokens",
    "build_lmm",
    "load_lmm",
]

IMAGE_TOKEN = "<image>"
_PLACEHOLDER = -200  # id of a visual-token slot in input_ids (LLaVA's IMAGE_TOKEN_INDEX)


@dataclass
class LMMConfig:
    """What a LLaVA-style model is made of (saved next to its projector)."""

    llm: str = "smollm2-135m"
    """Causal LM: the embedded name, a directory or a hub id."""
    vision: str = "mobilenet-v2"
    """Vision encoder: a registered name (``mobilenet-v2``), a directory or a hub id."""
    image_size: int = 224
    """Input side of the vision encoder (MobileNetV2 at 224 gives a 7 x 7 grid = 49 tokens)."""
    feature_layer: int = -2
    """ViT encoders only: hidden-state index whose patch tokens become visual tokens."""
    projector: Literal["mlp", "linear"] = "mlp"
    """``mlp``: Linear-GELU-Linear (LLaVA-1.5); ``linear``: one Linear (LLaVA-1)."""
    system_prompt: str | None = "Answer with one word."
    """System message of the chat template (``None``: the template's own default)."""

    def __post_init__(self) -> None:
        if self.projector not in ("mlp", "linear"):
            raise ValueError(
                f"LMMConfig.projector must be 'mlp' or 'linear', got {self.projector!r}"
            )
        if self.image_size < 32:
            raise ValueError(f"LMMConfig.image_size must be >= 32, got {self.image_size}")


# ----------------------------------------------------------------------------- visual tokens


def _cache_keyword(model: Any) -> str:
    """The name a model's forward takes its KV cache under: ``cache`` (transformers >= 5.2x,
    where ``past_key_values`` is deprecated) or ``past_key_values`` (earlier 5.x)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class VisualTokens(nn.Module):
    """A frozen vision encoder seen as a token sequence, with its blocks exposed for edits.

    ``forward`` maps pixels (B, 3, S, S) to tokens (B, N, C). ``blocks`` are the modules whose
    outputs may be edited; ``edit_block_output`` applies a function to the visual-token features
    (..., N, C) inside one block's output and returns the output in its own layout.
    """

    def __init__(self, encoder: VisionEncoder, feature_layer: int = -2):
        super().__init__()
        self.encoder = encoder
        self.preprocess = encoder.preprocess
        self.feature_layer = feature_layer
        net = getattr(encoder, "net", None)
        if net is not None and hasattr(net, "forward_levels"):  # the embedded MobileNetV2
            self.kind = "cnn"
            self._blocks = list(net.features)
        else:
            self.kind = "vit"
            inner = encoder.model
            depth = getattr(inner.config, "vision_config", inner.config).num_hidden_layers
            # the transformer's layer list (``encoder.layers`` in CLIP, ``layers`` in ViT)
            lists = [m for m in inner.modules() if isinstance(m, nn.ModuleList) and len(m) == depth]
            if len(lists) != 1:
                raise ValueError(
                    f"{type(inner).__name__}: expected one list of {depth} encoder layers to edit, "
                    f"found {len(lists)}"
                )
            layers = lists[0]
            # only the blocks up to the feature layer feed the visual tokens: hidden_states[f]
            # is the output of block f - 1 (hidden_states[0] is the embeddings)
            used = feature_layer if feature_layer >= 0 else depth + 1 + feature_layer
            if not 1 <= used <= depth:
                raise ValueError(
                    f"LMMConfig.feature_layer: {feature_layer} selects no encoder layer of "
                    f"{type(inner).__name__}'s {depth}"
                )
            self._blocks = list(layers)[:used]
            self.grid = encoder.grid
        with torch.no_grad():
            s = self.preprocess.size
            p = next(encoder.parameters())
            probe = torch.zeros(1, 3, s, s, device=p.device, dtype=p.dtype)
            widths, grids = {}, {}
            hooks = [
                b.register_forward_hook(self._probe(i, widths, grids))
                for i, b in enumerate(self._blocks)
            ]
            try:
                tokens = self(probe)
            finally:
                for h in hooks:
                    h.remove()
        self.num_tokens, self.width = int(tokens.shape[1]), int(tokens.shape[2])
        self.block_widths = [widths[i] for i in range(len(self._blocks))]
        self.block_tokens = [grids[i] for i in range(len(self._blocks))]

    def _probe(self, i: int, widths: dict, grids: dict):
        def hook(_m, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            if self.kind == "cnn":
                widths[i], grids[i] = int(h.shape[1]), int(h.shape[2] * h.shape[3])
            else:
                widths[i], grids[i] = int(h.shape[-1]), self.grid * self.grid

        return hook

    @property
    def blocks(self) -> list[nn.Module]:
        """The blocks whose outputs reach the visual tokens (a ViT's up to the feature layer;
        an edit on a later block would change nothing)."""
        return self._blocks

    def edit_block_output(self, output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        """Apply ``fn`` to the (B, N, C) visual-token features of a block output."""
        if self.kind == "cnn":
            b, c, h, w = output.shape
            tokens = output.flatten(2).transpose(1, 2)  # (B, H*W, C)
            return fn(tokens).transpose(1, 2).reshape(b, c, h, w)
        hidden = output[0] if isinstance(output, tuple) else output  # (B, prefix + N, C)
        prefix = hidden.shape[1] - self.grid * self.grid
        edited = torch.cat([hidden[:, :prefix], fn(hidden[:, prefix:])], dim=1)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, C)."""
        self.encoder.check_pixels(pixel_values)
        if self.kind == "cnn":
            last = self.encoder.net.forward_levels(pixel_values)[-1]  # (B, 1280, 7, 7)
            return last.flatten(2).transpose(1, 2)  # (B, 49, 1280), row-major grid
        # The feature layer's output, read by a hook registered now, so after any edit hook on
        # that block (MRT's): transformers may record ``hidden_states`` with hooks of its own
        # that run first and would see the block's output before the edit.
        captured: list[torch.Tensor] = []
        handle = self._blocks[-1].register_forward_hook(
            lambda _m, _inp, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        try:
            self.encoder.model(pixel_values=pixel_values)
        finally:
            handle.remove()
        hidden = captured[-1]  # (B, prefix + g*g, C) = hidden_states[feature_layer]
        return hidden[:, hidden.shape[1] - self.grid * self.grid :]


def make_projector(kind: str, c_in: int, d_model: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(c_in, d_model)
    return nn.Sequential(nn.Linear(c_in, d_model), nn.GELU(), nn.Linear(d_model, d_model))


# ----------------------------------------------------------------------------- batches


@dataclass
class LMMBatch:
    """A left-padded batch with each sample's real spans."""

    input_ids: torch.Tensor
    """(B, T) token ids; visual-token slots hold -200, padding holds the pad id."""
    attention_mask: torch.Tensor
    """(B, T) 1 on real tokens."""
    position_ids: torch.Tensor
    """(B, T) 0-based positions of real tokens (padding gets 0)."""
    image_mask: torch.Tensor
    """(B, T) True on visual-token slots."""
    prompt_start: torch.Tensor
    """(B,) index of each sample's first real token."""
    prompt_end: torch.Tensor
    """(B,) index one past the prompt's last token (the answer starts here)."""
    pixel_values: torch.Tensor | None
    """(n_images, 3, S, S) every image of the batch, sample by sample, in prompt order."""
    labels: torch.Tensor | None = None
    """(B, T) answer token ids, -100 elsewhere (training only)."""
    num_images: list[int] = field(default_factory=list)
    """Images per sample."""

    def to(self, device: torch.device | str) -> LMMBatch:
        moved = {
            k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()
        }
        return LMMBatch(**moved)


# ----------------------------------------------------------------------------- the model


class LlavaStyleModel(nn.Module):
    """Frozen vision tower -> projector -> visual tokens at ``<image>`` in a frozen causal LM."""

    def __init__(
        self,
        llm: nn.Module,
        tokenizer: Any,
        tower: VisualTokens,
        config: LMMConfig | None = None,
        projector: nn.Module | None = None,
    ):
        super().__init__()
        self.config = config or LMMConfig()
        self.llm = llm
        self.tokenizer = tokenizer
        self.tower = tower
        d_model = llm.get_input_embeddings().embedding_dim
        self.projector = projector or make_projector(self.config.projector, tower.width, d_model)
        p = next(llm.parameters())
        self.projector.to(device=p.device, dtype=p.dtype)
        self.llm.requires_grad_(False)
        self.tower.requires_grad_(False)
        self.projector.requires_grad_(False)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id
        self.end_of_answer, self.stop_ids = self._answer_end()

    def train(self, mode: bool = True) -> LlavaStyleModel:
        """Frozen parts never leave eval mode (BatchNorm statistics, dropout); adapter layers
        PEFT added to the LLM (LoRA's dropout) follow ``mode``."""
        super().train(mode)
        self.llm.eval()
        self.tower.eval()
        # PEFT imported by nobody means no PEFT layer can be in the model
        tuners = sys.modules.get("peft.tuners.tuners_utils")
        if tuners is not None:
            for module in self.llm.modules():
                if isinstance(module, tuners.BaseTunerLayer):  # its parts, not its base layer
                    for name in (*module.adapter_layer_names, *module.other_param_names):
                        part = getattr(module, name, None)
                        if isinstance(part, nn.Module):
                            part.train(mode)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    def _answer_end(self) -> tuple[int, set[int]]:
        """The token that ends an answer (the chat template's end of turn, else EOS) and every
        token that stops generation."""
        eos = self.tokenizer.eos_token_id
        end = eos
        if getattr(self.tokenizer, "chat_template", None):
            turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
            if isinstance(turn, int) and turn != getattr(self.tokenizer, "unk_token_id", None):
                end = turn
        return end, {i for i in (eos, end) if i is not None}

    # -- text ------------------------------------------------------------------------------
    def render_prompt(self, prompt: str) -> str:
        """The prompt in the LLM's chat format, ending where the answer begins."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            if self.config.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.config.system_prompt})
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        head = f"{self.config.system_prompt}\n" if self.config.system_prompt else ""
        return f"{head}USER: {prompt}\nASSISTANT: "

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def batch(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[ImageLike] | ImageLike | None],
        answers: Sequence[str] | None = None,
        pixel_values: Sequence[torch.Tensor | None] | None = None,
    ) -> LMMBatch:
        """Tokenise, place visual-token slots and left-pad; answers (if given) become labels.

        ``pixel_values`` (one (k, 3, S, S) tensor per sample) skips image preprocessing.
        """
        n = self.tower.num_tokens
        rows, labels, starts, ends, pixels, counts = [], [], [], [], [], []
        for i, prompt in enumerate(prompts):
            pieces = self.render_prompt(prompt).split(IMAGE_TOKEN)
            if pixel_values is not None and pixel_values[i] is not None:
                pix = pixel_values[i]
                k = pix.shape[0]
            else:
                ims = images[i]
                if ims is None:
                    ims = []
                elif not isinstance(ims, list | tuple):
                    ims = [ims]
                k = len(ims)
                pix = self.tower.preprocess(list(ims)) if k else None
            if len(pieces) - 1 != k:
                raise ValueError(
                    f"sample {i}: the prompt has {len(pieces) - 1} {IMAGE_TOKEN} placeholder(s) "
                    f"but {k} image(s) were given"
                )
            ids: list[int] = []
            for j, piece in enumerate(pieces):
                if j:
                    ids += [_PLACEHOLDER] * n
                ids += self._encode(piece)
            prompt_len = len(ids)
            lab = [-100] * prompt_len
            if answers is not None:
                ans = [*self._encode(answers[i]), self.end_of_answer]
                ids, lab = ids + ans, lab + ans
            rows.append(ids)
            labels.append(lab)
            ends.append(prompt_len)
            counts.append(k)
            if pix is not None:
                pixels.append(pix)
        width = max(len(r) for r in rows)
        b = len(rows)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        label_t = torch.full((b, width), -100, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
            pad = width - len(r)
            input_ids[i, pad:] = torch.tensor(r)
            label_t[i, pad:] = torch.tensor(lab)
            mask[i, pad:] = 1
            starts.append(pad)
            ends[i] += pad
        return LMMBatch(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(1) - 1).clamp(min=0),
            image_mask=input_ids == _PLACEHOLDER,
            prompt_start=torch.tensor(starts),
            prompt_end=torch.tensor(ends),
            pixel_values=torch.cat(pixels) if pixels else None,
            labels=label_t if answers is not None else None,
            num_images=counts,
        )

    # -- forward ---------------------------------------------------------------------------
    def visual(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, 3, S, S) -> projected visual tokens (n_images, N, d)."""
        p = next(self.projector.parameters())
        tokens = self.tower(pixel_values.to(device=p.device, dtype=p.dtype))
        return self.projector(tokens)

    def embed(self, batch: LMMBatch) -> torch.Tensor:
        """Input embeddings (B, T, d) with the visual tokens in their slots."""
        emb = self.llm.get_input_embeddings()(batch.input_ids.clamp(min=0))  # (B, T, d)
        if batch.pixel_values is None:
            if batch.image_mask.any():
                raise ValueError("the batch has visual-token slots but no pixel_values")
            return emb
        vis = self.visual(batch.pixel_values)  # (n_images, N, d)
        slots = int(batch.image_mask.sum())
        if slots != vis.shape[0] * vis.shape[1]:
            raise ValueError(
                f"the batch has {slots} visual-token slots but its {vis.shape[0]} image(s) give "
                f"{vis.shape[0] * vis.shape[1]} tokens"
            )
        # masked_scatter fills slots in row-major order: sample by sample, image by image
        return emb.masked_scatter(batch.image_mask[..., None], vis.reshape(-1, vis.shape[-1]))

    def forward(self, batch: LMMBatch) -> torch.Tensor:
        """Logits (B, T, V)."""
        out = self.llm(
            inputs_embeds=self.embed(batch),
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        return out.logits

    def loss(self, batch: LMMBatch) -> torch.Tensor:
        """Mean next-token cross-entropy over the answer tokens."""
        if batch.labels is None:
            raise ValueError("loss needs a batch built with answers")
        decoder = getattr(self.llm, self.llm.base_model_prefix)
        hidden = decoder(
            inputs_embeds=self.embed(batch),
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state  # (B, T, d)
        targets = batch.labels[:, 1:]  # position t predicts token t + 1
        keep = targets != -100  # (B, T - 1)
        # the vocabulary projection only where an answer token is predicted
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][keep])  # (n_answer, V)
        return F.cross_entropy(logits.float(), targets[keep])

    @torch.no_grad()
    def generate(
        self,
        batch: LMMBatch,
        max_new_tokens: int = 8,
        prefill_context: Callable[[], AbstractContextManager] | None = None,
    ) -> tuple[list[list[int]], torch.Tensor]:
        """Greedy decoding with a KV cache: (new token ids per sample, first-step logits (B, V)).

        ``prefill_context`` wraps only the prompt's forward (MRT edits prompt positions there).
        """
        from transformers import DynamicCache

        cache = DynamicCache()
        kv = {_cache_keyword(self.llm): cache}  # `cache` in newer transformers
        mask, pos = batch.attention_mask, batch.position_ids
        with (prefill_context or nullcontext)():
            out = self.llm(
                inputs_embeds=self.embed(batch),
                attention_mask=mask,
                position_ids=pos,
                **kv,
                use_cache=True,
            )
        first_logits = out.logits[:, -1].float()
        b = mask.shape[0]
        done = torch.zeros(b, dtype=torch.bool, device=mask.device)
        tokens: list[list[int]] = [[] for _ in range(b)]
        logits = first_logits
        pos = pos[:, -1:]
        for _ in range(max_new_tokens):
            nxt = logits.argmax(-1)  # (B,)
            for i in range(b):
                if not done[i]:
                    if int(nxt[i]) in self.stop_ids:
                        done[i] = True
                    else:
                        tokens[i].append(int(nxt[i]))
            if bool(done.all()):
                break
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos + 1
            out = self.llm(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=pos,
                **kv,
                use_cache=True,
            )
            logits = out.logits[:, -1].float()
        return tokens, first_logits

    def decode(self, tokens: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]

    # -- the projector as a file -----------------------------------------------------------
    def save_projector(self, directory: str | Path) -> Path:
        """Write the projector and this model's LMMConfig (method ``lmm-projector``)."""
        return write_adapter(
            directory,
            method="lmm-projector",
            tensors={f"projector.{k}": v for k, v in self.projector.state_dict().items()},
            config=asdict(self.config),
            base_model=self.llm,
        )

    def load_projector(self, directory: str | Path) -> None:
        _, tensors = read_adapter(directory, method="lmm-projector")
        load_adapter_tensors(self, tensors, source=str(directory), prefix="projector.")


def build_lmm(config: LMMConfig | None = None, **llm_kwargs: Any) -> LlavaStyleModel:
    """Load the LLM and the vision encoder named by ``config``; the projector starts random."""
    from mmtune.encoders.images import ImagePreprocess
    from mmtune.models.llm import load_llm

    config = config or LMMConfig()
    llm, tokenizer = load_llm(config.llm, **llm_kwargs)
    if config.vision == "mobilenet-v2":
        encoder = load_vision_encoder(
            config.vision, preprocess=ImagePreprocess(size=config.image_size, resize=None)
        )
    else:
        encoder = load_vision_encoder(config.vision)
    return LlavaStyleModel(llm, tokenizer, VisualTokens(encoder, config.feature_layer), config)


def load_lmm(directory: str | Path, **llm_kwargs: Any) -> LlavaStyleModel:
    """A LLaVA-style model from a stage-1 (``lmm-projector``) directory."""
    # One read: the digest is checked on the same bytes the projector is loaded from.
    meta, tensors = read_adapter(directory, method="lmm-projector")
    try:
        config = LMMConfig(**meta["config"])
    except TypeError as e:
        raise ValueError(f"{Path(directory) / 'adapter_config.json'}: field 'config': {e}") from e
    model = build_lmm(config, **llm_kwargs)
    load_adapter_tensors(model, tensors, source=str(directory), prefix="projector.")
    return model
