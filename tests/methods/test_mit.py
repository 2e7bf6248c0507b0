"""MiT: identity at init, formulas, training, save/load, backends, caching, batching, errors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ARCHS, D_I, perturb, position_ids, tiny_config, tiny_model
from mmtune import MiTConfig, MiTModel, inject_mit, paper_layers

FORMS = ["paper", "residual", "gated"]


def _ids(batch=3, length=7, seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def _modality(batch=3, seed=0):
    return torch.randn(batch, D_I, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- identity


def test_gated_form_at_init_is_the_base_model(arch):
    model = tiny_model(arch)
    ids = _ids()
    with torch.no_grad():
        base = model(input_ids=ids).logits
        mit = inject_mit(model, MiTConfig(d_modality=D_I, layers="all", form="gated"))
        out = mit(input_ids=ids, modality=_modality()).logits
    assert (out - base).abs().max().item() <= 1e-6


@pytest.mark.parametrize("form", FORMS)
def test_centered_gate_is_identity_at_init_for_paper_and_gated(form):
    model = tiny_model("llama")
    ids = _ids()
    with torch.no_grad():
        base = model(input_ids=ids).logits
        cfg = MiTConfig(d_modality=D_I, layers="all", form=form, gate="centered")
        out = inject_mit(model, cfg)(input_ids=ids, modality=_modality()).logits
    diff = (out - base).abs().max().item()
    if form == "residual":  # K + (K*1 + 0)*1 = 2K: the authors' form is not identity at init
        assert diff > 1e-3
    else:
        assert diff <= 1e-6


def test_paper_form_with_sigmoid_gate_is_not_identity_at_init():
    # docs/design.md: sigmoid(0 + cos) != 1, so the literal paper form changes the model at init.
    model = tiny_model("llama")
    ids = _ids()
    with torch.no_grad():
        base = model(input_ids=ids).logits
        out = inject_mit(model, MiTConfig(d_modality=D_I, layers="all", form="paper"))(
            input_ids=ids, modality=_modality()
        ).logits
    assert (out - base).abs().max().item() > 1e-3


def test_disabled_adapter_and_unload_give_the_base_model(arch):
    model = tiny_model(arch)
    ids = _ids()
    with torch.no_grad():
        base = model(input_ids=ids).logits
        mit = perturb(inject_mit(model, MiTConfig(d_modality=D_I, layers="all", form="paper")))
        infused = mit(input_ids=ids, modality=_modality()).logits
        assert (infused - base).abs().max().item() > 1e-3  # the adapter does act
        with mit.disable_adapter():
            off = mit(input_ids=ids).logits
            off_direct = model(input_ids=ids).logits  # hooks stay quiet on direct calls too
        restored = mit.unload()
        after = restored(input_ids=ids).logits
    assert restored is model
    for x in (off, off_direct, after):
        assert (x - base).abs().max().item() <= 1e-6
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="unloaded"):
        mit(input_ids=ids, modality=_modality())


def test_v_proj_multiplies_once_per_infused_layer_and_unload_restores_it():
    model = tiny_model("llama")
    calls = []
    for layer in model.model.layers:  # count the real matmuls of every v_proj
        v = layer.self_attn.v_proj
        v.forward = lambda x, v=v: (calls.append(1), torch.nn.functional.linear(x, v.weight))[1]
    mit = perturb(inject_mit(model, MiTConfig(d_modality=D_I, layers="all", form="paper")))
    with torch.no_grad():
        mit(input_ids=_ids(), modality=_modality())
    assert len(calls) == len(model.model.layers)  # the key hook's values are reused
    mit.unload()
    assert all("forward" in layer.self_attn.v_proj.__dict__ for layer in model.model.layers)
    calls.clear()
    with torch.no_grad():
        model(input_ids=_ids())
    assert len(calls) == len(model.model.layers)  # the counting forwards are back, alone


def test_unload_restores_requires_grad_flags():
    model = tiny_model("llama")
    model.lm_head.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    mit = inject_mit(model, MiTConfig(d_modality=D_I))
    assert not any(p.requires_grad for p in mit.base_model.parameters())
    mit.unload()
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- formulas


def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x, pos, theta):
    """Rotary embedding written out: pairs (i, i + d/2) rotated by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv[None, :]  # (T, d/2)
    cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _reference_llama(model, ids, I, infusion: dict, form, gate_kind):
    """A LLaMA forward written from scratch with eqs. 1-7 of the paper applied literally.

    Independent of mmtune's code path: it reads only the weights.
    """
    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    Dh = cfg.hidden_size // H
    B, T = ids.shape
    pos = torch.arange(T)
    x = model.model.embed_tokens.weight[ids]
    causal = torch.full((T, T), float("-inf")).triu(1)
    for idx, layer in enumerate(model.model.layers, start=1):
        a = layer.self_attn
        h = _rms(x, layer.input_layernorm.weight, cfg.rms_norm_eps)
        Q = h @ a.q_proj.weight.T
        K = h @ a.k_proj.weight.T
        V = h @ a.v_proj.weight.T
        p = infusion.get(str(idx))
        if p is not None:

            def lin(m):
                return I @ m.weight.T + m.bias  # eq. 1: I . W + b

            Idk, Iak = lin(p.k_scale)[:, None], lin(p.k_shift)[:, None]
            Idv, Iav = lin(p.v_scale)[:, None], lin(p.v_shift)[:, None]
            # eq. 4: L' = L + cos(V_t^h, P(I)^h), per token and head
            Vh = V.view(B, T, Hkv, Dh)
            Ph = (I @ p.gate_proj.weight.T).view(B, 1, Hkv, Dh)
            cos = (Vh * Ph).sum(-1) / (Vh.norm(dim=-1) * Ph.norm(dim=-1))
            if gate_kind == "sigmoid":
                g = torch.sigmoid(p.gate_logit + cos)
            else:
                g = 2 * torch.sigmoid(p.gate_logit + p.gate_beta * cos)
            g = g.repeat_interleave(Dh, dim=-1)  # (B, T, d_kv): one gate per head
            if form == "paper":  # eqs. 2, 3, 5
                K = (K * Idk + Iak) * g
                V = (V * Idv + Iav) * g
            elif form == "residual":
                K = K + (K * Idk + Iak) * g
                V = V + (V * Idv + Iav) * g
            else:
                K = K + g * (K * (Idk - 1) + Iak)
                V = V + g * (V * (Idv - 1) + Iav)
        q = _rotate(Q.view(B, T, H, Dh).transpose(1, 2), pos, cfg.rope_parameters["rope_theta"])
        k = _rotate(K.view(B, T, Hkv, Dh).transpose(1, 2), pos, cfg.rope_parameters["rope_theta"])
        v = V.view(B, T, Hkv, Dh).transpose(1, 2)
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / Dh**0.5 + causal, dim=-1)  # eq. 6
        o = (att @ v).transpose(1, 2).reshape(B, T, H * Dh)
        x = x + o @ a.o_proj.weight.T
        m = layer.mlp
        h = _rms(x, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
        Ht = torch.nn.functional.silu(h @ m.gate_proj.weight.T) * (h @ m.up_proj.weight.T)
        if p is not None:
            Ht = Ht * (I @ p.ff_scale.weight.T + p.ff_scale.bias)[:, None]  # eq. 7
        x = x + Ht @ m.down_proj.weight.T
    x = _rms(x, model.model.norm.weight, cfg.rms_norm_eps)
    return x @ model.lm_head.weight.T


@pytest.mark.parametrize("gate", ["sigmoid", "centered"])
@pytest.mark.parametrize("form", FORMS)
def test_module_matches_a_hand_written_reference_of_eqs_1_to_7(form, gate):
    model = tiny_model("llama", num_layers=3).double()
    mit = perturb(inject_mit(model, MiTConfig(d_modality=D_I, layers=[2, 3], form=form, gate=gate)))
    ids, I = _ids(), _modality().double()
    with torch.no_grad():
        out = mit(input_ids=ids, modality=I).logits
        ref = _reference_llama(model, ids, I, dict(mit.infusion.items()), form, gate)
        frozen = _reference_llama(model, ids, I, {}, form, gate)
    # transformers computes RMSNorm and RoPE tables in float32 even for a float64 model, so the
    # two paths agree to ~4e-8; the infusion itself moves the logits by orders of magnitude more.
    assert (out - ref).abs().max().item() < 1e-7
    assert (out - frozen).abs().max().item() > 1e-2


def test_gpt2_fused_qkv_matches_manual_infusion_of_c_attn():
    """GPT-2: the hook on the fused c_attn equals infusing k and v of its output by hand."""
    model = tiny_model("gpt2", num_layers=1).double()
    mit = perturb(inject_mit(model, MiTConfig(d_modality=D_I, layers=[1], form="residual")))
    ids, I = _ids(), _modality().double()
    block, p = model.transformer.h[0], mit.infusion["1"]
    x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(ids.shape[1]))
    h = block.ln_1(x)
    with mit.disable_adapter(), torch.no_grad():
        q, k, v = block.attn.c_attn(h).split(32, dim=-1)
    with torch.no_grad(), mit.using_modality(I):
        got = block.attn.c_attn(h)

    def lin(m):
        return (I @ m.weight.T + m.bias)[:, None]

    B, T = ids.shape
    cos = torch.nn.functional.cosine_similarity(
        v.view(B, T, 4, 8), (I @ p.gate_proj.weight.T).view(B, 1, 4, 8), dim=-1
    )
    g = torch.sigmoid(p.gate_logit + cos).repeat_interleave(8, dim=-1)
    k_ref = k + (k * lin(p.k_scale) + lin(p.k_shift)) * g
    v_ref = v + (v * lin(p.v_scale) + lin(p.v_shift)) * g
    torch.testing.assert_close(got, torch.cat([q, k_ref, v_ref], -1), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- training


def test_one_step_changes_only_infusion_parameters_and_saved_keys_are_exact(arch, tmp_path):
    model = tiny_model(arch)
    mit = perturb(inject_mit(model, MiTConfig(d_modality=D_I, layers="paper")), std=0.05)
    before = {n: p.detach().clone() for n, p in mit.named_parameters()}
    trainable = [p for p in mit.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    ids = _ids()
    mit.train()
    loss = mit(input_ids=ids, labels=ids, modality=_modality()).loss
    loss.backward()
    opt.step()
    changed = {n for n, p in mit.named_parameters() if not torch.equal(p, before[n])}
    infusion = {n for n, _ in mit.named_parameters() if n.startswith("infusion.")}
    assert {n for n, p in mit.named_parameters() if p.requires_grad} == infusion
    assert changed == infusion  # every infusion tensor got a gradient and moved

    mit.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "adapter.safetensors")) == infusion
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["method"] == "mit" and meta["base_model_type"] == arch
    assert meta["config"]["d_modality"] == D_I and "mmtune_version" in meta
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_parameter_report_counts_infusion_only_as_trainable():
    model = tiny_model("llama")
    n_base = sum(p.numel() for p in model.parameters())
    mit = inject_mit(model, MiTConfig(d_modality=D_I, layers=[1, 4]))
    report = mit.trainable_parameters()
    # per layer: 4 K/V maps (12*16+16) + gate P (12*16) + L (2 heads) + FF map (12*48+48)
    per_layer = 4 * (D_I * 16 + 16) + D_I * 16 + 2 + (D_I * 48 + 48)
    assert report.trainable == 2 * per_layer
    assert report.total == n_base + 2 * per_layer
    assert "trainable%" in str(report)


def test_llama2_7b_shape_share_counted_on_meta_device():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    mit = inject_mit(model, MiTConfig(d_modality=768, layers="paper"))
    assert mit.layer_ids == [13, 17, 21, 25, 29, 32]
    report = mit.trainable_parameters()
    per_layer = 5 * (768 * 4096 + 4096) - 4096 + (768 * 11008 + 11008) + 32
    assert report.trainable == 6 * per_layer
    assert report.total - report.trainable == 6_738_415_616  # LLaMA-2-7B
    assert 0.020 < report.share < 0.025


# ----------------------------------------------------------------------------- save / load


def test_save_load_roundtrip_on_a_fresh_base_model(arch, tmp_path):
    mit = perturb(inject_mit(tiny_model(arch), MiTConfig(d_modality=D_I, form="residual")))
    ids, I = _ids(), _modality()
    with torch.no_grad():
        expected = mit(input_ids=ids, modality=I).logits
    mit.save_pretrained(tmp_path / "adapter")
    fresh = tiny_model(arch)  # same seed, same base weights
    loaded = MiTModel.from_pretrained(fresh, tmp_path / "adapter")
    assert loaded.mit_config == mit.mit_config
    with torch.no_grad():
        got = loaded(input_ids=ids, modality=I).logits
    assert torch.equal(got, expected)


def test_loading_onto_a_different_model_names_the_problem(tmp_path):
    inject_mit(tiny_model("llama"), MiTConfig(d_modality=D_I, layers=[2])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="saved on a 'llama' model"):
        MiTModel.from_pretrained(tiny_model("gpt2"), tmp_path)
    other = tiny_model("llama")
    with pytest.raises(ValueError, match="shape mismatches"):
        cfg = tiny_config("llama")
        cfg.intermediate_size = 40
        from transformers import AutoModelForCausalLM

        MiTModel.from_pretrained(AutoModelForCausalLM.from_config(cfg), tmp_path)
    (tmp_path / "adapter.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match=r"adapter\.safetensors: SHA-256 differs"):
        MiTModel.from_pretrained(other, tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        MiTModel.from_pretrained(other, tmp_path)


# ----------------------------------------------------------------------------- backends, cache


@pytest.mark.parametrize("arch", ARCHS)
def test_eager_equals_sdpa(arch):
    ids, I = _ids(), _modality()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row
    outs = []
    for attn in ("eager", "sdpa"):
        mit = perturb(inject_mit(tiny_model(arch, attn), MiTConfig(d_modality=D_I, form="paper")))
        with torch.no_grad():
            out = mit(
                input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), modality=I
            ).logits
        outs.append(out * mask[..., None])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_cached_generation_equals_uncached_forward(arch):
    config = MiTConfig(d_modality=D_I, layers="all", form="gated")
    mit = perturb(inject_mit(tiny_model(arch, "sdpa"), config))
    ids, I = _ids(batch=2, length=5), _modality(batch=2)
    gen = mit.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        modality=I,
        max_new_tokens=6,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    seq = gen.sequences
    assert seq.shape[1] == ids.shape[1] + 6
    with torch.no_grad():
        full = mit(input_ids=seq, modality=I).logits  # no cache, whole sequence at once
    step_logits = torch.stack(gen.logits, dim=1)  # (B, new, V) from the cached steps
    torch.testing.assert_close(step_logits, full[:, ids.shape[1] - 1 : -1], rtol=1e-4, atol=1e-5)
    with mit.disable_adapter():
        plain = mit.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(plain, seq)  # the modality changed what was generated


def test_beam_search_expands_modality_per_sample():
    mit = perturb(inject_mit(tiny_model("llama"), MiTConfig(d_modality=D_I)))
    ids, I = _ids(batch=2, length=4), _modality(batch=2)
    both = mit.generate(
        input_ids=ids, modality=I, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0
    )
    alone = [
        mit.generate(
            input_ids=ids[i : i + 1],
            modality=I[i : i + 1],
            max_new_tokens=4,
            num_beams=3,
            do_sample=False,
            pad_token_id=0,
        )
        for i in range(2)
    ]
    assert torch.equal(both, torch.cat(alone))


# ----------------------------------------------------------------------------- batching, padding


def test_batch_of_different_modalities_equals_each_sample_alone(arch):
    mit = perturb(inject_mit(tiny_model(arch), MiTConfig(d_modality=D_I, form="paper")))
    ids, I = _ids(batch=4), _modality(batch=4)
    with torch.no_grad():
        batched = mit(input_ids=ids, modality=I).logits
        single = torch.cat(
            [mit(input_ids=ids[i : i + 1], modality=I[i : i + 1]).logits for i in range(4)]
        )
        swapped = mit(input_ids=ids, modality=I.flip(0)).logits
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
    assert (swapped - batched).abs().max() > 1e-3  # the modality really reaches each row


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_batch_equals_unpadded_samples(arch, attn):
    mit = perturb(inject_mit(tiny_model(arch, attn), MiTConfig(d_modality=D_I, form="paper")))
    lengths = [7, 4, 2]
    rows = [_ids(batch=1, length=n, seed=i)[0] for i, n in enumerate(lengths)]
    T = max(lengths)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :], mask[i, T - len(r) :] = r, 1
    I = _modality(batch=3)
    with torch.no_grad():
        padded = mit(
            input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), modality=I
        ).logits
        for i, r in enumerate(rows):
            alone = mit(input_ids=r[None], modality=I[i : i + 1]).logits[0]
            torch.testing.assert_close(padded[i, T - len(r) :], alone, rtol=1e-5, atol=1e-5)


def test_right_padded_batch_equals_unpadded_samples():
    mit = perturb(inject_mit(tiny_model("llama", "sdpa"), MiTConfig(d_modality=D_I)))
    rows = [_ids(batch=1, length=n, seed=i)[0] for i, n in enumerate([6, 3])]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    I = _modality(batch=2)
    with torch.no_grad():
        padded = mit(input_ids=ids, attention_mask=mask, modality=I).logits
        for i, r in enumerate(rows):
            alone = mit(input_ids=r[None], modality=I[i : i + 1]).logits[0]
            torch.testing.assert_close(padded[i, : len(r)], alone, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- errors


def test_bad_modality_inputs_raise_clear_errors():
    mit = inject_mit(tiny_model("llama"), MiTConfig(d_modality=D_I, layers="all"))
    ids = _ids(batch=2)
    with pytest.raises(ValueError, match=r"width 5 differs from MiTConfig.d_modality 12"):
        mit(input_ids=ids, modality=torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"shape \(batch, d_modality=12\); got \(12,\)"):
        mit(input_ids=ids, modality=torch.randn(12))
    with pytest.raises(ValueError, match="needs modality"):
        mit(input_ids=ids)
    bad = torch.randn(2, D_I)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite values in batch rows \[1\]"):
        mit(input_ids=ids, modality=bad)
    bad[1, 3] = float("-inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        mit.generate(input_ids=ids, modality=bad, max_new_tokens=2)
    with pytest.raises(ValueError, match="modality has 3 rows but the inputs have batch size 2"):
        mit(input_ids=ids, modality=torch.randn(3, D_I))
    with pytest.raises(TypeError, match="floating-point"):
        mit(input_ids=ids, modality=torch.ones(2, D_I, dtype=torch.long))
    # the base model called directly while infusion is active: no silent frozen forward
    with pytest.raises(RuntimeError, match="MiT layer 1: MiT infusion is active but no modality"):
        mit.base_model(input_ids=ids)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="d_modality must be positive"):
        MiTConfig(d_modality=0)
    with pytest.raises(ValueError, match="1-based"):
        MiTConfig(d_modality=4, layers=[0, 2])
    with pytest.raises(ValueError, match="'paper' or 'all'"):
        MiTConfig(d_modality=4, layers="last")
    with pytest.raises(ValueError, match="form must be"):
        MiTConfig(d_modality=4, form="lora")
    with pytest.raises(ValueError, match="needs kv_infusion=True"):
        MiTConfig(d_modality=4, kv_infusion=False)
    with pytest.raises(ValueError, match="nothing to do"):
        MiTConfig(d_modality=4, kv_infusion=False, head_rescaling=False, ff_infusion=False)
    with pytest.raises(ValueError, match=r"\[5\] out of range: this model has 4 layers"):
        inject_mit(tiny_model("llama"), MiTConfig(d_modality=4, layers=[1, 5]))


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(
        BertConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            vocab_size=30,
        )
    )
    supported = r"'bert' is not supported; supported: .*gpt2, .*llama, .*phi3"
    with pytest.raises(ValueError, match=supported):
        inject_mit(model, MiTConfig(d_modality=4))


def test_paper_layer_rule():
    assert paper_layers(32) == [13, 17, 21, 25, 29, 32]
    assert paper_layers(30) == [11, 15, 19, 23, 27, 30]  # SmolLM2-135M
    assert paper_layers(4) == [1, 4]


# ----------------------------------------------------------------------------- ablation switches


@pytest.mark.parametrize(
    "switches",
    [
        {"kv_infusion": True, "head_rescaling": False, "ff_infusion": False},
        {"kv_infusion": False, "head_rescaling": False, "ff_infusion": True},
        {"kv_infusion": True, "head_rescaling": True, "ff_infusion": False},
    ],
)
def test_ablation_switches_build_only_their_parameters_and_train(switches):
    mit = perturb(inject_mit(tiny_model("llama"), MiTConfig(d_modality=D_I, **switches)))
    names = {n.split(".")[2] for n, _ in mit.named_parameters() if n.startswith("infusion.")}
    expected = set()
    if switches["kv_infusion"]:
        expected |= {"k_scale", "k_shift", "v_scale", "v_shift"}
    if switches["head_rescaling"]:
        expected |= {"gate_proj", "gate_logit"}
    if switches["ff_infusion"]:
        expected |= {"ff_scale"}
    assert names == expected
    ids = _ids()
    loss = mit(input_ids=ids, labels=ids, modality=_modality()).loss
    loss.backward()
    assert all(p.grad is not None for p in mit.infusion.parameters())


def _enable_checkpointing(model, reentrant):
    kwargs = {"use_reentrant": reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _mit_grads(arch, form, checkpointing, *, inject_first=True, length=9):
    torch.manual_seed(1)
    model = tiny_model(arch)
    cfg = MiTConfig(d_modality=D_I, layers="all", form=form)
    if checkpointing is not None and not inject_first:
        _enable_checkpointing(model, checkpointing)
    mit = inject_mit(model, cfg)
    perturb(mit)
    if checkpointing is not None and inject_first:
        _enable_checkpointing(model, checkpointing)
    mit.train()
    ids = _ids(length=length)
    modality = _modality().requires_grad_(True)  # a trainable encoder's output has a graph
    loss = mit(input_ids=ids, labels=ids, modality=modality).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in mit.infusion.named_parameters()}
    return loss.item(), grads, modality.grad.clone()


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_gradient_checkpointing_gives_the_gradients_of_the_plain_run(arch, form, reentrant):
    """The replay in backward runs with the modality of its forward: loss, every infusion
    gradient and the modality's own gradient equal the run without checkpointing."""
    loss, grads, dmod = _mit_grads(arch, form, None)
    for inject_first in (True, False):  # checkpointing switched on after or before injecting
        c_loss, c_grads, c_dmod = _mit_grads(arch, form, reentrant, inject_first=inject_first)
        assert c_loss == pytest.approx(loss, abs=1e-6)
        assert c_grads.keys() == grads.keys()
        for name, g in grads.items():
            assert torch.allclose(c_grads[name], g, atol=1e-6, rtol=1e-5), name
        assert torch.allclose(c_dmod, dmod, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_saves_less_for_backward_on_a_longer_sequence():
    """Activation memory, measured as the bytes autograd saves for backward (outside any
    checkpointed layer): with checkpointing a layer keeps only its inputs."""

    def saved_bytes(checkpointing):
        torch.manual_seed(1)
        mit = inject_mit(tiny_model("llama", num_layers=6), MiTConfig(d_modality=D_I, layers="all"))
        if checkpointing:
            _enable_checkpointing(mit.base_model, False)
        mit.train()
        ids = _ids(batch=4, length=96)
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = mit(input_ids=ids, labels=ids, modality=_modality(batch=4)).loss
        loss.backward()
        return total[0]

    plain, checkpointed = saved_bytes(False), saved_bytes(True)
    assert checkpointed < 0.5 * plain, (plain, checkpointed)


def test_reentrant_checkpointing_with_a_modality_that_has_a_graph_is_refused_with_the_fix():
    """Reentrant checkpointing replays a layer outside the graph of I: a trainable encoder's
    output would be backpropagated once per layer. One clear line names the fix."""
    model = tiny_model("llama")
    mit = inject_mit(model, MiTConfig(d_modality=D_I, layers="all"))
    _enable_checkpointing(model, True)
    mit.train()
    encoder = torch.nn.Linear(5, D_I)
    with pytest.raises(ValueError, match="use_reentrant=False"):
        mit(input_ids=_ids(), modality=encoder(torch.randn(3, 5)))


def test_modality_context_is_cleared_after_an_exception():
    mit = inject_mit(tiny_model("llama"), MiTConfig(d_modality=D_I))
    with pytest.raises(IndexError):  # token id out of the vocabulary: the forward itself fails
        mit(input_ids=torch.full((1, 3), 10_000), modality=_modality(batch=1))
    assert mit._ctx is None
    with pytest.raises(RuntimeError, match="no modality vector is set"):
        mit.base_model(input_ids=_ids(batch=1))


def test_bf16_base_model_keeps_fp32_adapter_and_identity_at_init():
    model = tiny_model("llama").to(torch.bfloat16)
    ids = _ids()
    with torch.no_grad():
        base = model(input_ids=ids).logits
    mit = inject_mit(model, MiTConfig(d_modality=D_I, form="gated"))
    assert all(p.dtype == torch.float32 for p in mit.infusion.parameters())
    with torch.no_grad():
        out = mit(input_ids=ids, modality=_modality()).logits
    assert out.dtype == torch.bfloat16 and torch.equal(out, base)
    perturb(mit)
    loss = mit(input_ids=ids, labels=ids, modality=_modality().to(torch.bfloat16)).loss
    loss.backward()
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 for p in mit.infusion.parameters()
    )


def test_layer_sets_written_for_another_depth_scale_to_the_model():
    """The paper's Table 5 sets (for 32 layers) on other depths: round(l * N / 32), >= 1."""
    assert MiTConfig(layers="13,17,21,25,29,32/32").resolve_layers(32) == [13, 17, 21, 25, 29, 32]
    assert MiTConfig(layers="1,9,17,25,32/32").resolve_layers(30) == [1, 8, 16, 23, 30]
    assert MiTConfig(layers="21,25,29,32/32").resolve_layers(4) == [3, 4]  # merged, not repeated
    for bad in ("1,9/0", "1,40/32", "a,b/32", "1,9,17", "last"):
        with pytest.raises(ValueError, match=r"MiTConfig\.layers"):
            MiTConfig(layers=bad)


# ----------------------------------------------------------------------------- map_rank


def test_low_rank_maps_are_identity_at_init_for_the_gated_form(arch):
    model = tiny_model(arch)
    ids = _ids()
    with torch.no_grad():
        base = model(input_ids=ids).logits
        cfg = MiTConfig(d_modality=D_I, layers="all", form="gated", map_rank=4)
        out = inject_mit(model, cfg)(input_ids=ids, modality=_modality()).logits
    assert (out - base).abs().max().item() <= 1e-6


def test_low_rank_maps_equal_full_maps_holding_their_product(arch):
    # Golden check: rank-r maps B (A I) + b are the full maps W I + b with W = B A.
    low = perturb(inject_mit(tiny_model(arch), MiTConfig(d_modality=D_I, layers="all", map_rank=3)))
    full = inject_mit(tiny_model(arch), MiTConfig(d_modality=D_I, layers="all"))
    with torch.no_grad():
        for name, layer in low.infusion.items():
            target = full.infusion[name]
            a = layer.map_down.weight  # (r, d_I)
            for part in ("k_scale", "k_shift", "v_scale", "v_shift", "ff_scale", "gate_proj"):
                b, t = getattr(layer, part), getattr(target, part)
                t.weight.copy_(b.weight @ a)
                if b.bias is not None:
                    t.bias.copy_(b.bias)
            target.gate_logit.copy_(layer.gate_logit)
        ids, I = _ids(), _modality()
        expected = full(input_ids=ids, modality=I).logits
        got = low(input_ids=ids, modality=I).logits
    assert (got - expected).abs().max().item() <= 1e-4
    assert (got - tiny_model(arch)(input_ids=ids).logits).abs().max().item() > 1e-3  # it acts


def test_low_rank_maps_save_load_train_and_shrink_the_share(tmp_path):
    cfg = MiTConfig(d_modality=D_I, layers="all", map_rank=2)
    mit = inject_mit(tiny_model("llama"), cfg)
    ids, I = _ids(), _modality()
    loss = mit(input_ids=ids, modality=I).logits.square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in mit.infusion.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "k_scale" in n)
    perturb(mit)
    with torch.no_grad():
        expected = mit(input_ids=ids, modality=I).logits
    mit.save_pretrained(tmp_path / "adapter")
    loaded = MiTModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")
    assert loaded.mit_config.map_rank == 2
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, modality=I).logits, expected)
    full = inject_mit(tiny_model("llama"), MiTConfig(d_modality=D_I, layers="all"))
    assert mit.trainable_parameters().trainable < full.trainable_parameters().trainable
    with pytest.raises(ValueError, match="map_rank must be a positive int"):
        MiTConfig(map_rank=0)
