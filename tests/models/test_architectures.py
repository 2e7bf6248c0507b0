"""Every model family in the architecture table: hooks land in the right place."""

from __future__ import annotations

import pytest
import torch

from conftest import D_I, perturb, tiny_model
from mmtune import ArchitectureSpec, MiTConfig, inject_mit, register_architecture
from mmtune.models.architectures import get_architecture, supported_model_types


@pytest.mark.parametrize("model_type", supported_model_types())
def test_family_identity_batching_and_cache(model_type):
    ids = torch.randint(3, 97, (3, 6), generator=torch.Generator().manual_seed(0))
    modality = torch.randn(3, D_I, generator=torch.Generator().manual_seed(1))
    model = tiny_model(model_type, "eager" if model_type == "gemma2" else "sdpa")
    with torch.no_grad():
        base = model(input_ids=ids).logits
        mit = inject_mit(model, MiTConfig(d_modality=D_I, layers="all", form="gated"))
        assert (mit(input_ids=ids, modality=modality).logits - base).abs().max() == 0
        perturb(mit)
        batched = mit(input_ids=ids, modality=modality).logits
        single = torch.cat(
            [mit(input_ids=ids[i : i + 1], modality=modality[i : i + 1]).logits for i in range(3)]
        )
    assert (batched - base).abs().max() > 1e-2  # the hooks reach this family's K, V and FF
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    gen = mit.generate(
        input_ids=ids,
        modality=modality,
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        full = mit(input_ids=gen.sequences, modality=modality).logits
    torch.testing.assert_close(
        torch.stack(gen.logits, 1), full[:, ids.shape[1] - 1 : -1], rtol=1e-4, atol=1e-5
    )


def test_spec_needs_separate_or_fused_projections():
    with pytest.raises(ValueError, match="either both k_proj and v_proj, or qkv_proj"):
        ArchitectureSpec(layers="model.layers", k_proj="a", ff_down="b")
    with pytest.raises(ValueError, match="either both"):
        ArchitectureSpec(layers="m", k_proj="a", v_proj="b", qkv_proj="c", ff_down="d")


def test_a_wrong_spec_names_the_missing_module():
    register_architecture(
        "test_broken",
        ArchitectureSpec(
            layers="model.layers",
            k_proj="self_attn.key",
            v_proj="self_attn.v_proj",
            ff_down="mlp.down_proj",
        ),
    )
    try:
        model = tiny_model("llama")
        model.config.model_type = "test_broken"
        with pytest.raises(ValueError, match=r"no module at 'self_attn.key' \(missing 'key'\)"):
            inject_mit(model, MiTConfig(d_modality=D_I))
    finally:
        from mmtune.models import architectures

        architectures._ARCHITECTURES.pop("test_broken")
    assert get_architecture("llama").k_proj == "self_attn.k_proj"
