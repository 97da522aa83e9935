"""`verify_checkpoint` on real ModelOpt NVFP4 and llm-compressor FP8-block exports of the tiny GLM-4.7 (trained) and
GLM-4.7-Flash (random): the report, a straightforward reference computation of every metric, and planted faults."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from verify_faults import (
    nan_block_scale,
    own_up_global_scale,
    planted,
    rescale_norm_not_router,
    swap_nibbles,
    zero_input_scale,
    zero_weights,
)

from sm120_quant.models.load import resolve_source
from sm120_quant.recipes.schema import ModelSpec, VerifySpec
from sm120_quant.verify.metrics import TokenTotals, token_stats
from sm120_quant.verify.prompts import BUILTIN_PROMPTS
from sm120_quant.verify.reader import CheckpointReader, relative_error
from sm120_quant.verify.verify import verify_checkpoint

pytestmark = pytest.mark.slow

PROMPTS = list(BUILTIN_PROMPTS[:4])  # conftest.PROMPTS: ModelOpt's fake-quant logits are kept for these
TOKENS = 96


def _verify(ckpt, source_folder, **kw):
    kw.setdefault("prompts", PROMPTS)
    kw.setdefault("max_prompt_tokens", TOKENS)
    kw.setdefault("generate_tokens", 0)
    return verify_checkpoint(ckpt, resolve_source(ModelSpec(id=str(source_folder))), VerifySpec(), **kw)


@pytest.fixture(scope="module")
def glm47_nvfp4_report(glm47_nvfp4, trained_glm47, tmp_path_factory):
    return _verify(glm47_nvfp4, trained_glm47, out_dir=tmp_path_factory.mktemp("report"), generate_tokens=4)


# --------------------------------------------------------------------------------------------------------------------
# Reports on the four exports
# --------------------------------------------------------------------------------------------------------------------


def test_report_files_and_layout(glm47_nvfp4_report):
    r = glm47_nvfp4_report
    assert r.passed, r.failures
    assert r.layouts == {"nvfp4": 100}  # 4 attention x 4 layers + 3 dense MLP + 3 x (8 x 3 + 3) MoE
    assert r.activations == {"nvfp4": 100}
    assert [m.kind for m in r.layers] == ["dense", "moe", "moe", "moe"]
    json_path, png_path = r.files
    assert json.loads(Path(json_path).read_text()) == json.loads(json.dumps(r.to_dict()))
    assert Path(png_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(r.generations) == 3 and all(len(g.prompt) > 0 for g in r.generations)


@pytest.mark.parametrize("export, source, layout, activation, weight_error", [
    ("flash_nvfp4", "tiny_glm47_flash", "nvfp4", "nvfp4", (0.09, 0.10)),
    ("flash_fp8", "tiny_glm47_flash", "fp8_block", "fp8_group", (0.025, 0.029)),
    ("glm47_fp8", "trained_glm47", "fp8_block", "fp8_group", (0.025, 0.029)),
])
def test_reports_on_exports(request, export, source, layout, activation, weight_error):
    r = _verify(request.getfixturevalue(export), request.getfixturevalue(source))
    assert r.passed, r.failures
    assert set(r.layouts) == {layout} and set(r.activations) == {activation}
    quantized = [m.error for m in r.modules if m.layout != "dense"]
    assert weight_error[0] < min(quantized) and max(quantized) < weight_error[1]
    assert all(m.error == 0.0 for m in r.modules if m.layout == "dense")  # router, norms, embeddings copied exactly
    assert all(0.7 < m.routing_local <= 1.0 for m in r.layers if m.kind == "moe")


def test_trained_model_quality_ordering(glm47_nvfp4_report, glm47_fp8, trained_glm47):
    """On trained weights FP8-block is closer to BF16 than NVFP4 on every metric, and both stay close."""
    nvfp4 = glm47_nvfp4_report
    fp8 = _verify(glm47_fp8, trained_glm47, prompts=list(BUILTIN_PROMPTS[:4]), max_prompt_tokens=96)
    assert fp8.kl < nvfp4.kl < 0.1
    assert nvfp4.top1 < fp8.top1 and nvfp4.cosine < fp8.cosine
    assert abs(math.log(fp8.ppl_quantized / fp8.ppl_source)) < abs(math.log(nvfp4.ppl_quantized / nvfp4.ppl_source))


# --------------------------------------------------------------------------------------------------------------------
# The metrics equal a straightforward reference computation
# --------------------------------------------------------------------------------------------------------------------


def _reference_models(ckpt, source_folder):
    """The source and the quantized model as whole transformers models: the source loaded by transformers, the
    quantized one the same model with every quantized linear's weight replaced by its dequantized weight, every other
    tensor taken from the checkpoint, and NVFP4 fake quantization of the inputs by forward pre-hooks."""
    from transformers import AutoModelForCausalLM

    from sm120_quant.quantize import formats
    from sm120_quant.quantize.moe import expand_experts

    def load():
        m = AutoModelForCausalLM.from_pretrained(source_folder, dtype=torch.float32, experts_implementation="eager")
        expand_experts(m)
        return m.eval()

    source, quant = load(), load()
    reader = CheckpointReader(ckpt)
    for name, tensor in quant.state_dict().items():
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and reader.layout(module) != "dense":
            w = reader.linear(module)
            tensor.copy_(w.weight)
            amax = torch.tensor(w.input_scale * 6 * 448)
            quant.get_submodule(module).register_forward_pre_hook(
                lambda mod, args, amax=amax: (formats.fake_quant_nvfp4(args[0], amax),))
        else:
            tensor.copy_(reader.get(name))
    return source, quant


def test_metrics_equal_reference(glm47_nvfp4, trained_glm47, glm47_nvfp4_report):
    from transformers import AutoTokenizer

    source, quant = _reference_models(glm47_nvfp4, trained_glm47)
    tokenizer = AutoTokenizer.from_pretrained(trained_glm47)
    routes, outputs = {"s": {}, "q": {}}, {"s": {}, "q": {}}
    for tag, model in (("s", source), ("q", quant)):
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_hook(lambda m, a, out, i=i, tag=tag: outputs[tag].__setitem__(i, out))
            if hasattr(layer.mlp, "gate") and not isinstance(layer.mlp.gate, torch.nn.Linear):
                layer.mlp.gate.register_forward_hook(
                    lambda m, a, out, i=i, tag=tag: routes[tag].setdefault(i, []).append(out[2]))
    cos, kl, top1, nll_s, nll_q, positions = [], [], [], [], [], 0
    err2 = [[0.0, 0.0] for _ in source.model.layers]
    with torch.no_grad():
        for text in PROMPTS:
            ids = torch.tensor([tokenizer(text)["input_ids"][:TOKENS]])
            out_s, out_q = source(ids), quant(ids)
            ls, lq = out_s.logits[0].double(), out_q.logits[0].double()
            for t in range(ls.shape[0]):
                cos.append(float(torch.dot(ls[t], lq[t]) / (ls[t].norm() * lq[t].norm())))
                p, q = torch.softmax(ls[t], -1), torch.softmax(lq[t], -1)
                kl.append(float((p * (p.log() - q.log())).sum()))
                top1.append(int(ls[t].argmax() == lq[t].argmax()))
            nll_s.append(float(torch.nn.functional.cross_entropy(ls[:-1], ids[0, 1:], reduction="sum")))
            nll_q.append(float(torch.nn.functional.cross_entropy(lq[:-1], ids[0, 1:], reduction="sum")))
            positions += ls.shape[0] - 1
            for i in range(len(source.model.layers)):
                hs, hq = outputs["s"][i], outputs["q"][i]
                err2[i][0] += float((hq - hs).double().pow(2).sum())
                err2[i][1] += float(hs.double().pow(2).sum())
    r = glm47_nvfp4_report
    assert r.cosine == pytest.approx(sum(cos) / len(cos), rel=1e-5)
    assert r.kl == pytest.approx(sum(kl) / len(kl), rel=1e-4, abs=1e-7)
    assert r.top1 == pytest.approx(sum(top1) / len(top1), abs=1 / len(top1))
    assert r.ppl_source == pytest.approx(math.exp(sum(nll_s) / positions), rel=1e-5)
    assert r.ppl_quantized == pytest.approx(math.exp(sum(nll_q) / positions), rel=1e-4)
    for i, m in enumerate(r.layers):
        assert m.stream_error == pytest.approx(math.sqrt(err2[i][0] / err2[i][1]), rel=1e-3)
        if m.kind == "moe":
            same = [bool((a.sort(-1).values == b.sort(-1).values).all()) for sa, sq in zip(routes["s"][i],
                                                                                         routes["q"][i])
                    for a, b in zip(sa, sq)]
            assert m.routing_stream == pytest.approx(sum(same) / len(same), abs=1 / len(same))


def test_emulation_agrees_with_modelopt_fake_quant(glm47_nvfp4, glm47_nvfp4_report):
    """ModelOpt's own W4A4 fake-quant model (before export) and our emulation of the export are two independent
    computations of the quantized model; their distance from BF16 must agree. (Not bit for bit: ModelOpt fake-
    quantizes weights with the kernel's math, computes in BF16, and the export rounds block scales its own way.)"""
    totals = TokenTotals()
    for (bf16, fake), prompt_ids in zip(torch.load(glm47_nvfp4 / "modelopt_fakequant_logits.pt"),
                                        glm47_nvfp4_report_ids(glm47_nvfp4_report)):
        totals.add(token_stats(bf16, fake, prompt_ids))
    modelopt, ours = totals.summary(), glm47_nvfp4_report
    assert ours.kl == pytest.approx(modelopt["kl"], rel=0.25)
    assert ours.top1 == pytest.approx(modelopt["top1"], abs=0.03)
    assert ours.cosine == pytest.approx(modelopt["cosine"], abs=2e-3)


def glm47_nvfp4_report_ids(report) -> list:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(report.source)
    return [torch.tensor(tokenizer(p)["input_ids"][:TOKENS]) for p in PROMPTS]


def test_weight_errors_equal_reference(glm47_nvfp4, trained_glm47, glm47_nvfp4_report):
    """Per tensor: ||W_q - W_s|| / ||W_s||, and for a norm's consumer the same with both sides times the norm."""
    quant, src = CheckpointReader(glm47_nvfp4), CheckpointReader(trained_glm47)
    by_name = {m.module: m.error for m in glm47_nvfp4_report.modules}
    down = "model.layers.2.mlp.experts.5.down_proj"
    assert by_name[down] == pytest.approx(relative_error(quant.linear(down).weight, src.get(f"{down}.weight")))
    up = "model.layers.2.mlp.experts.5.up_proj"
    norm = "model.layers.2.post_attention_layernorm.weight"
    expected = relative_error(quant.linear(up).weight * quant.get(norm).float(),
                              src.get(f"{up}.weight").float() * src.get(norm).float())
    assert by_name[up] == pytest.approx(expected, rel=1e-6)
    assert 0.09 < by_name[up] < 0.1


# --------------------------------------------------------------------------------------------------------------------
# Planted faults: each is caught, and the first failure names the layer (and module) it is in
# --------------------------------------------------------------------------------------------------------------------

L = 2


@pytest.mark.parametrize("make_fault, check, target", [
    (swap_nibbles, "weight_error", "experts.{e}.down_proj"),
    (own_up_global_scale, "defect", "experts.{e}"),
    (zero_input_scale, "defect", "experts.{e}.down_proj"),
    (nan_block_scale, "defect", "experts.{e}.gate_proj"),
    (rescale_norm_not_router, "weight_error", None),
    (zero_weights, "defect", "experts.{e}.down_proj"),
], ids=["swapped-nibbles", "gate-up-global-scale", "zero-input-scale", "nan-block-scale", "norm-not-router",
        "all-zero-weight"])
def test_planted_fault_nvfp4(glm47_nvfp4, trained_glm47, glm47_nvfp4_report, tmp_path, make_fault, check, target):
    clean = glm47_nvfp4_report
    # The expert the held-out tokens use most, so the runtime's NaN shows up in outputs too, not only statically.
    busiest = max(range(8), key=lambda e: clean.layers[L].expert_tokens[e])
    if target is None:
        fault, module = make_fault(L), f"model.layers.{L}.mlp.gate"
    else:
        fault = make_fault(f"model.layers.{L}.mlp." + target.format(e=busiest))
        module = f"model.layers.{L}.mlp." + target.format(e=busiest) + (".up_proj" if target.endswith("}") else "")
    r = _verify(planted(glm47_nvfp4, tmp_path / "ckpt", fault), trained_glm47)
    assert not r.passed
    first = r.failures[0]
    assert (first.check, first.layer, first.module) == (check, L, module)
    errors = {m.module: m.error for m in r.modules}
    if check == "weight_error" and module.endswith("down_proj"):
        assert errors[module] > 1.0  # the reference dequantizer measures 1.41 with swapped nibbles
    if module.endswith("up_proj"):
        assert errors[module] == pytest.approx(0.75, abs=0.02)  # up computed with gate's scale, 1/4 of its own
        assert "differs from its fused siblings'" in first.message and "(0.25x its own)" in first.message
    elif make_fault is zero_weights:
        assert r.failures[0].message == f"{module}: every E2M1 code is zero"
        assert module in r.layers[L].dead_modules and any(f.check == "dead_module" for f in r.failures)
    elif check == "defect":  # the runtime computes NaN for every token routed there, and nowhere before that layer
        assert r.layers[L].nonfinite > 0 and r.layers[L].first_nonfinite_module == module
        assert all(m.nonfinite == 0 for m in r.layers[:L])
    if module.endswith("mlp.gate"):
        assert errors[module] > 0.1
        assert r.layers[L].routing_local < clean.layers[L].routing_local


@pytest.mark.parametrize("fault, check, module", [
    (nan_block_scale(f"model.layers.{L}.mlp.shared_experts.gate_proj"), "defect",
     f"model.layers.{L}.mlp.shared_experts.gate_proj"),
    (rescale_norm_not_router(L), "weight_error", f"model.layers.{L}.mlp.gate"),
], ids=["nan-block-scale", "norm-not-router"])
def test_planted_fault_fp8(flash_fp8, tiny_glm47_flash, tmp_path, fault, check, module):
    r = _verify(planted(flash_fp8, tmp_path / "ckpt", fault), tiny_glm47_flash)
    first = r.failures[0]
    assert (first.check, first.layer, first.module) == (check, L, module)
