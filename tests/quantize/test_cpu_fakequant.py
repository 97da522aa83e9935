"""ModelOpt 0.47 NVFP4 on CPU: calibrate with `mtq.quantize`, then check the fake-quant forward is our math exactly."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from sm120_quant.quantize.cpu_fakequant import (
    cpu_nvfp4_fakequant,
    disable_cpu_nvfp4_fakequant,
    enable_cpu_nvfp4_fakequant,
)
from sm120_quant.quantize.formats import dequantize_nvfp4, fake_quant_nvfp4, quantize_nvfp4
from sm120_quant.quantize.modelopt_engine import forget_moe_registrations

MODELOPT_CPU_ERROR = "amax must be a CUDA tensor for dynamic block quantization."


@pytest.fixture(scope="module")
def mtq():
    with warnings.catch_warnings():
        # ModelOpt warns that transformers 5.17 is newer than it was tested with.
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
    return mtq


@pytest.fixture
def tensor_quant(mtq):
    from modelopt.torch.quantization import tensor_quant

    disable_cpu_nvfp4_fakequant()
    yield tensor_quant
    disable_cpu_nvfp4_fakequant()


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 96)
        self.down = torch.nn.Linear(96, 48)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.fixture(scope="module")
def calibrated_linears(mtq):
    torch.manual_seed(0)
    model = TwoLinears().to(torch.bfloat16)
    batches = [torch.randn(2, 8, 64, dtype=torch.bfloat16) for _ in range(4)]

    def forward_loop(m):
        for batch in batches:
            m(batch)

    # Max calibration collects amax without fake-quantizing, so it runs on CPU even without the patch.
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
    return model, batches


def reference_linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """NVFP4 W4A4 as ModelOpt's fake quant defines it: quantized activations times the exported weight."""
    q = quantize_nvfp4(layer.weight)
    weight = dequantize_nvfp4(q.packed, q.block_scale, q.global_scale, dtype=layer.weight.dtype)
    return F.linear(fake_quant_nvfp4(x, layer.input_quantizer.amax), weight, layer.bias)


def test_modelopt_without_patch_asserts_cuda(tensor_quant, calibrated_linears):
    model, batches = calibrated_linears
    with pytest.raises(AssertionError, match=MODELOPT_CPU_ERROR):
        model(batches[0])


def test_quantized_linear_equals_reference(tensor_quant, calibrated_linears):
    model, batches = calibrated_linears
    x = batches[0]
    with torch.no_grad(), cpu_nvfp4_fakequant():
        hidden = model.up(x)
        out = model.down(torch.relu(hidden))
    assert torch.equal(hidden, reference_linear(model.up, x))
    assert torch.equal(out, reference_linear(model.down, torch.relu(hidden)))
    # Max calibration: the weight amax is the weight's, the input amax the largest activation of all batches.
    assert model.up.weight_quantizer.amax.item() == model.up.weight.abs().max().item()
    assert model.up.input_quantizer.amax.item() == torch.stack(batches).abs().max().item()


def test_enable_is_idempotent_and_disable_restores(tensor_quant):
    modelopt_op = tensor_quant.dynamic_block_quantize_op
    enable_cpu_nvfp4_fakequant()
    patched = tensor_quant.dynamic_block_quantize_op
    enable_cpu_nvfp4_fakequant()
    assert tensor_quant.dynamic_block_quantize_op is patched
    assert patched.modelopt_op is modelopt_op
    disable_cpu_nvfp4_fakequant()
    assert tensor_quant.dynamic_block_quantize_op is modelopt_op


def test_context_manager_keeps_an_earlier_enable(tensor_quant):
    modelopt_op = tensor_quant.dynamic_block_quantize_op
    with cpu_nvfp4_fakequant():
        assert tensor_quant.dynamic_block_quantize_op is not modelopt_op
    assert tensor_quant.dynamic_block_quantize_op is modelopt_op
    enable_cpu_nvfp4_fakequant()
    with cpu_nvfp4_fakequant():
        pass
    assert tensor_quant.dynamic_block_quantize_op is not modelopt_op


def test_other_devices_reach_modelopt_op(tensor_quant):
    # A meta tensor stands in for CUDA: it must reach ModelOpt's own op (whose meta kernel returns an empty tensor),
    # not fake_quant_nvfp4, which cannot run on it.
    x = torch.empty(4, 32, device="meta")
    with cpu_nvfp4_fakequant():
        out = tensor_quant.dynamic_block_quantize_op(x, 16, torch.empty((), device="meta"), 4, 2, 8, 4)
        # Global scale 1 and block scale 0.5: 3.1 is 6.2 scaled, which saturates to 6, i.e. 3.0.
        cpu_out = tensor_quant.dynamic_block_quantize_op(torch.full((1, 16), 3.1), 16, torch.tensor(2688.0), 4, 2, 8, 4)
    assert (out.device.type, tuple(out.shape)) == ("meta", (4, 32))
    assert cpu_out.tolist() == [[3.0] * 16]


def _tiny_glm4moe():
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    config = Glm4MoeConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        max_position_embeddings=64,
    )
    config.architectures = ["Glm4MoeForCausalLM"]
    torch.manual_seed(0)
    return Glm4MoeForCausalLM(config).to(torch.bfloat16).eval()


def test_moe_registration_from_an_expanded_model_is_forgotten_for_a_fused_one(mtq):
    from modelopt.torch.quantization.nn import QuantModuleRegistry
    from modelopt.torch.quantization.plugins.huggingface import register_sparse_moe_on_the_fly

    from sm120_quant.quantize.moe import expand_experts

    fused, expanded = _tiny_glm4moe(), _tiny_glm4moe()
    expand_experts(expanded)
    moe = type(fused.model.layers[1].mlp)
    forget_moe_registrations(fused)
    register_sparse_moe_on_the_fly(fused)
    assert moe not in QuantModuleRegistry  # fused experts: ModelOpt leaves the block to its fused-experts wrapper
    register_sparse_moe_on_the_fly(expanded)
    assert QuantModuleRegistry.get_key(moe) == f"hf.{moe.__name__}"  # a sequential MoE now, for the whole process
    forget_moe_registrations(fused)
    assert moe not in QuantModuleRegistry


def test_glm4moe_attention_and_experts(mtq, tensor_quant):
    model = _tiny_glm4moe()
    ids = torch.randint(0, 256, (4, 16))
    forget_moe_registrations(model)  # other tests' expanded models made ModelOpt register Glm4MoeMoE their way

    def forward_loop(m):
        for batch in ids.split(2):
            m(batch)

    with torch.no_grad():
        mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
    q_proj = model.model.layers[1].self_attn.q_proj
    captured = {}
    q_proj.register_forward_hook(lambda module, args, out: captured.update(x=args[0], y=out))

    with torch.no_grad(), cpu_nvfp4_fakequant():
        logits = model(ids[:1]).logits
        experts = model.model.layers[1].mlp.experts
        expert_weight = experts.gate_up_proj[3]
        fake_expert = experts.gate_up_proj_weight_quantizers[3](expert_weight)

    assert bool(torch.isfinite(logits).all())
    assert torch.equal(captured["y"], reference_linear(q_proj, captured["x"]))
    q = quantize_nvfp4(expert_weight)
    assert torch.equal(fake_expert, dequantize_nvfp4(q.packed, q.block_scale, q.global_scale, dtype=torch.bfloat16))
