"""A 4-bit frozen base (bitsandbytes' CPU backend): MiT, concat and LoRA on top, full-precision
trained parts, identity at init; training through 4-bit layers is a CUDA check."""

from __future__ import annotations

import pytest
import torch

from mmtune import MiTConfig, inject_mit
from mmtune.models.llm import QuantizationConfig, load_llm

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (mmtune[quant])")

D_I = 12


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    """A tiny LLaMA wide enough for bitsandbytes' 4-bit blocks (64 values), saved as a user's."""
    from tests.tiny_assets import tiny_llm_dir

    return tiny_llm_dir(tmp_path_factory.mktemp("llm"), num_layers=3, hidden_size=128)


def _ids(batch=2, length=7):
    return torch.randint(3, 20, (batch, length), generator=torch.Generator().manual_seed(0))


def test_the_llm_loads_in_4_bits_and_mit_on_it_starts_as_the_quantized_model(llm_dir):
    llm, _ = load_llm(str(llm_dir), quantization=QuantizationConfig(bits=4))
    assert isinstance(llm.model.layers[0].self_attn.k_proj, bnb.nn.Linear4bit)
    ids = _ids()
    with torch.no_grad():
        base = llm(input_ids=ids).logits
        mit = inject_mit(llm, MiTConfig(d_modality=D_I, layers="all", form="gated"))
        out = mit(input_ids=ids, modality=torch.randn(2, D_I)).logits
    assert (out - base).abs().max().item() <= 1e-6
    trained = [p for p in mit.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert {id(p) for p in trained} == {id(p) for p in mit.infusion.parameters()}


def test_lora_sits_on_the_4_bit_layers_in_full_precision(llm_dir):
    from mmtune.methods.concat import PeftAdapterConfig, inject_peft

    llm, _ = load_llm(str(llm_dir), quantization=QuantizationConfig(bits=4))
    llm.requires_grad_(False)
    inject_peft(llm, "lora", PeftAdapterConfig())
    trained = {n: p for n, p in llm.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and p.dtype == torch.float32 for n, p in trained.items())
    with torch.no_grad():
        assert torch.isfinite(llm(input_ids=_ids()).logits).all()


def test_a_train_config_names_the_quantization(tmp_path):
    from mmtune.training.config import load_train_config

    path = tmp_path / "q.yaml"
    path.write_text("model: {quantization: {bits: 4, type: nf4, compute_dtype: bfloat16}}\n")
    q = load_train_config(path).model.quantization
    assert (q.bits, q.type, q.compute_dtype) == (4, "nf4", "bfloat16")
    with pytest.raises(ValueError, match="bits must be 4, 8 or null"):
        QuantizationConfig(bits=3)


def test_a_missing_bitsandbytes_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
    )
    with pytest.raises(ValueError, match=r"needs bitsandbytes: pip install 'mmtune\[quant\]'"):
        QuantizationConfig(bits=4).transformers_config()


def _mit_grads(llm):
    torch.manual_seed(5)
    mit = inject_mit(llm, MiTConfig(d_modality=D_I, layers="all"))
    with torch.no_grad():
        for p in mit.infusion.parameters():
            p.add_(0.1 * torch.randn_like(p))
    mit.train()
    ids = _ids()
    modality = torch.randn(2, D_I, generator=torch.Generator().manual_seed(1))
    mit(input_ids=ids, labels=ids, modality=modality).loss.backward()
    return {n: p.grad for n, p in mit.infusion.named_parameters()}


def test_on_the_cpu_gradients_through_4_bit_layers_are_the_dequantized_models(llm_dir):
    """Golden check: a training step through the 4-bit layers (fp32 compute) gives the
    gradients of an fp32 model holding the dequantized weights."""
    from bitsandbytes.functional import dequantize_4bit

    q4, _ = load_llm(str(llm_dir), quantization=QuantizationConfig(bits=4, compute_dtype="float32"))
    ref, _ = load_llm(str(llm_dir))
    for name, module in q4.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            target = ref.get_submodule(name).weight
            target.data.copy_(w.reshape(target.shape))
    got, want = _mit_grads(q4), _mit_grads(ref)
    for name, g in want.items():
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-5)


def test_bitsandbytes_cpu_drops_gradients_after_a_no_grad_forward_so_train_refuses(
    llm_dir, tmp_path
):
    """bitsandbytes 0.50's CPU backend repacks a 4-bit weight at its first forward without
    grad, and its matmul has no autograd kernel after that: every gradient is dropped. An
    evaluation between epochs is such a forward, so ``mmtune train`` refuses a quantized base
    on the CPU (one line). When this test fails, bitsandbytes has fixed it: lift the refusal."""
    from mmtune.recipes.train import TrainConfig, train
    from mmtune.training.config import ModelConfig

    llm, _ = load_llm(str(llm_dir), quantization=QuantizationConfig(bits=4))
    mit = inject_mit(llm, MiTConfig(d_modality=D_I, layers="all"))
    with torch.no_grad():
        mit(input_ids=_ids(), modality=torch.randn(2, D_I))
    mit.train()
    ids = _ids()
    mit(input_ids=ids, labels=ids, modality=torch.randn(2, D_I)).loss.backward()
    assert all(p.grad is None for p in mit.infusion.parameters())
    cfg = TrainConfig(
        model=ModelConfig(llm=str(llm_dir), quantization=QuantizationConfig(bits=4)),
        output_dir=str(tmp_path / "run"),
    )
    with pytest.raises(ValueError, match="training through a quantized LLM needs CUDA"):
        train(cfg, progress=False)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="training through a 4-bit base is a CUDA path (on the CPU bitsandbytes drops the "
    "gradients after a forward without grad: the test above); benchmarks/gpu_check.sh trains "
    "MiT on a 4-bit base on CUDA",
)
def test_mit_trains_through_a_4_bit_base_on_cuda(llm_dir):
    llm, _ = load_llm(str(llm_dir), quantization=QuantizationConfig(bits=4), device_map="cuda")
    mit = inject_mit(llm, MiTConfig(d_modality=D_I, layers="all"))
    mit.train()
    ids = _ids().cuda()
    loss = mit(input_ids=ids, labels=ids, modality=torch.randn(2, D_I, device="cuda")).loss
    loss.backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in mit.infusion.parameters()
    )
