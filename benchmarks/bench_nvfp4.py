"""NVFP4 at real GLM-4.7 layer dimensions: our pipeline's stages next to calling ModelOpt directly.

    python benchmarks/bench_nvfp4.py --layers 3               # on a GPU (H100/H200): prints a markdown table
    python benchmarks/bench_nvfp4.py --tiny                   # smoke run on CPU with tiny dimensions
    python benchmarks/bench_nvfp4.py --layers 3 --awq-passes  # AWQ-lite search: one pass vs one layer per pass

Both sides start from the same random BF16 Glm4MoeForCausalLM (hidden 5120, 96/8 heads, head_dim 128, 160 experts
top-8, moe_intermediate 1536, vocab 151552; layer 0 dense, the rest MoE) and the same random calibration tokens.
"ModelOpt" is mtq.quantize + export_hf_checkpoint on the fused model; "sm120-quant" is our quantize stage (expert
expansion with its logits check, calibration) and export stage (export, tokenizer/MTP copy, checkpoint doctor).
Times are wall-clock seconds with CUDA synchronized; memory is torch's peak allocated GPU memory per variant.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

GLM47 = dict(vocab_size=151552, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
             num_attention_heads=96, num_key_value_heads=8, head_dim=128, n_routed_experts=160,
             num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
             use_qk_norm=True, attention_bias=True, partial_rotary_factor=0.5, norm_topk_prob=True,
             n_group=1, topk_group=1, num_nextn_predict_layers=0, max_position_embeddings=8192)
TINY = dict(GLM47, vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, n_routed_experts=8, num_experts_per_tok=2)


def build(dims: dict, layers: int, device: str):
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    config = Glm4MoeConfig(**dims, num_hidden_layers=layers, architectures=["Glm4MoeForCausalLM"])
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    with torch.device(device):
        model = Glm4MoeForCausalLM(config).to(torch.bfloat16).eval()
    for m in model.modules():  # as the hub checkpoints: router bias and rotary frequencies in fp32
        for name, buf in m.named_buffers(recurse=False):
            if name in ("inv_freq", "original_inv_freq", "e_score_correction_bias"):
                setattr(m, name, buf.float())
    return model


def synced() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def reset_peak():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def recipe(scheme: str):
    from sm120_quant.recipes.load import parse_recipe

    return parse_recipe(f"""
model: {{id: bench}}
scheme: {scheme}
engine: modelopt
calibration: {{passes: [{{name: random, source: builtin, builtin: code, samples: 1}}]}}
export: {{output_dir: unused}}
""")


def raw_modelopt(model, batches, out: Path, cfg_name: str) -> dict:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    from sm120_quant.quantize.modelopt_engine import forget_moe_registrations
    from sm120_quant.quiet import library_output

    def loop(m):
        for b in batches:
            m(**b)

    forget_moe_registrations(model)  # ModelOpt as a fresh process would see this model, whatever ran before
    t0 = synced()
    with torch.no_grad(), library_output():
        mtq.quantize(model, getattr(mtq, cfg_name), loop)
    t1 = synced()
    with torch.no_grad(), library_output():
        export_hf_checkpoint(model, export_dir=out)
    t2 = synced()
    return {"quantize": t1 - t0, "export": t2 - t1}


def ours(model, batches, out: Path, scheme: str) -> dict:
    from sm120_quant.exporters.check import check_checkpoint
    from sm120_quant.exporters.modelopt_export import export_modelopt
    from sm120_quant.quantize import quantize

    t0 = synced()
    quantized = quantize(recipe(scheme), model, tokenizer=None, source=None, calib=batches, progress=False)
    t1 = synced()
    export_modelopt(quantized, out, "5GB")
    t2 = synced()
    report = check_checkpoint(out, deep=False)
    t3 = synced()
    timings = {"quantize": t1 - t0, "export": t2 - t1, "check": t3 - t2}
    timings.update({f"  {k}": v for k, v in quantized.timings.items()})
    timings["findings"] = len(report.findings)
    return timings


def awq_passes(dims: dict, layers: int, device: str, batches) -> None:
    """Our AWQ-lite search in one calibration pass vs one layer per pass, the memory-bounded mode a full model
    needs: time, peak memory, and whether both find the same scales."""
    from sm120_quant.quantize import awq
    from sm120_quant.quantize.moe import expand_experts

    def loop(m):
        with torch.no_grad():
            for b in batches:
                m(**b)

    found = []
    print("\n| AWQ-lite search | passes | seconds | peak GPU GiB |\n|---|---|---|---|")
    for label, budget in (("one pass", None), ("one layer per pass", 0)):
        model = build(dims, layers, device)
        expand_experts(model)
        reset_peak()
        t0 = synced()
        smoothing = awq.smooth(model, loop, [], capture_budget=budget)
        seconds = synced() - t0
        print(f"| {label} | {smoothing.passes} | {seconds:.1f} | {peak_gib():.1f} |", flush=True)
        norms = [layer.post_attention_layernorm.weight.detach().clone() for layer in model.model.layers]
        found.append((smoothing.groups, norms))
        del model
    (groups_a, norms_a), (groups_b, norms_b) = found
    same = groups_a == groups_b and all(torch.equal(a, b) for a, b in zip(norms_a, norms_b, strict=True))
    print(f"same scales and folded norms: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="tiny dimensions, for a CPU smoke run")
    ap.add_argument("--awq", action="store_true", help="also compare AWQ-lite (ours vs ModelOpt's)")
    ap.add_argument("--awq-passes", action="store_true",
                    help="only time our AWQ-lite search in one pass vs one layer per pass")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # ModelOpt's own AWQ-lite needs the pure-torch NVFP4 fake-quant there too
        from sm120_quant.quantize.cpu_fakequant import enable_cpu_nvfp4_fakequant

        enable_cpu_nvfp4_fakequant()
    dims = TINY if args.tiny else GLM47
    seq = min(args.seq, 64) if args.tiny else args.seq
    samples = min(args.samples, 8) if args.tiny else args.samples
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, dims["vocab_size"], (samples, seq), generator=gen)
    batches = [{"input_ids": ids[i:i + args.batch].to(device)} for i in range(0, samples, args.batch)]
    if args.awq_passes:
        awq_passes(dims, args.layers, device, batches)
        return

    t0 = synced()
    model = build(dims, args.layers, device)
    build_s = synced() - t0
    params = sum(p.numel() for p in model.parameters())
    t0 = synced()
    with torch.no_grad():
        for b in batches:
            model(**b)
    fwd_s = synced() - t0

    variants = [("ModelOpt NVFP4 (max)", lambda m, o: raw_modelopt(m, batches, o, "NVFP4_DEFAULT_CFG"))]
    if args.awq:
        variants.append(("ModelOpt NVFP4 AWQ-lite", lambda m, o: raw_modelopt(m, batches, o, "NVFP4_AWQ_LITE_CFG")))
    variants.append(("sm120-quant NVFP4 (max)", lambda m, o: ours(m, batches, o, "nvfp4")))
    if args.awq:
        variants.append(("sm120-quant NVFP4 AWQ-lite", lambda m, o: ours(m, batches, o, "nvfp4_awq_lite")))
    rows = []
    for name, fn in variants:
        # Both tools change the model in place (quantizers, packed weights): every variant gets a fresh one, and
        # the fixed seed makes it the same model.
        del model
        reset_peak()
        model = build(dims, args.layers, device)
        out = Path(tempfile.mkdtemp(prefix="bench-"))
        try:
            timings = fn(model, out)
            size = sum(p.stat().st_size for p in out.iterdir()) / 2**30
        finally:
            shutil.rmtree(out, ignore_errors=True)
        rows.append((name, timings, peak_gib(), size))

    print(f"\nGLM-4.7 dims, {args.layers} layers ({params / 1e9:.2f} B params), {samples}x{seq} tokens, "
          f"batch {args.batch}, device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    print(f"build {build_s:.1f} s; BF16 forward over the calibration set {fwd_s:.2f} s\n")
    print("| variant | quantize s | export s | check s | total s | peak GPU GiB | written GiB |")
    print("|---|---|---|---|---|---|---|")
    for name, t, peak, size in rows:
        total = t["quantize"] + t["export"] + t.get("check", 0.0)
        print(f"| {name} | {t['quantize']:.1f} | {t['export']:.1f} | {t.get('check', 0.0):.2f} | {total:.1f} | "
              f"{peak:.1f} | {size:.2f} |")
    for name, t, _, _ in rows:
        extra = {k.strip(): round(v, 2) for k, v in t.items() if k.startswith("  ")}
        if extra:
            print(f"{name} stages: {extra}; findings: {t.get('findings')}")


if __name__ == "__main__":
    main()
