"""Write a model calibrated by llm-compressor as a compressed-tensors checkpoint (what vLLM loads with
`--quantization compressed-tensors`, picked up from config.json), and the compressed-tensors spelling of exclusions."""

from __future__ import annotations

import re
from pathlib import Path

from sm120_quant.errors import CheckFailed
from sm120_quant.exporters.checkpoint import read_json
from sm120_quant.quantize.model import QuantizedModel
from sm120_quant.quiet import library_output

# llm-compressor writes its modifier list as recipe.yaml; the report stage writes our resolved recipe under that name.
LLMC_RECIPE = "recipe.yaml"
LLMC_RECIPE_KEPT = "llmcompressor_recipe.yaml"


def ct_ignore_entry(module_glob: str) -> str:
    """Module-name glob (fnmatch: `*`, `?`, `[0-2]`, `[!0]`) -> compressed-tensors ignore entry.

    compressed-tensors and vLLM match an ignore entry as an exact module name, or as `re:` + a regex applied with
    `re.match` (anchored at the start only); they know no globs, so `model.layers.92*` would match nothing. The regex
    uses only constructs every Python `re` reads (fnmatch.translate emits atomic groups, which need 3.11).
    """
    if not any(c in module_glob for c in "*?["):
        return module_glob
    out, i, n = [], 0, len(module_glob)
    while i < n:
        c = module_glob[i]
        close = _class_end(module_glob, i) if c == "[" else -1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif close > 0:
            body = module_glob[i + 1:close]
            negate = body.startswith("!")
            out.append(_class_regex(body[1:] if negate else body, negate))
            i = close
        else:
            out.append(re.escape(c))
        i += 1
    return "re:" + "".join(out) + "$"


def _class_regex(body: str, negate: bool) -> str:
    """A glob character class body (without `[`, `!`, `]`) as a regex class. `x-y` is a range, `-` first or last is
    a literal; a range whose end sorts before its start matches nothing, as in fnmatch (in `re` it is an error), and
    a class left empty matches nothing, or any character when negated."""
    items, k = [], 0
    while k < len(body):
        if k + 2 < len(body) and body[k + 1] == "-":
            lo, hi = body[k], body[k + 2]
            k += 3
            if lo <= hi:
                items.append(f"{_class_char(lo)}-{_class_char(hi)}")
        else:
            items.append(_class_char(body[k]))
            k += 1
    if not items:
        return "." if negate else "(?!)"
    return "[" + ("^" if negate else "") + "".join(items) + "]"


def _class_char(c: str) -> str:
    return "\\" + c if c in "\\]^-[&~|" else c


def _class_end(glob: str, start: int) -> int:
    """Index of the `]` closing the character class opened at `start`, or -1 when `[` is a literal (as in fnmatch,
    a `]` right after `[` or `[!` belongs to the class)."""
    j = start + 1
    if j < len(glob) and glob[j] == "!":
        j += 1
    if j < len(glob) and glob[j] == "]":
        j += 1
    return glob.find("]", j)


def export_llmcompressor(quantized: QuantizedModel, folder: Path, max_shard_size: str) -> None:
    """`save_pretrained(save_compressed=True)`: FP8 block weights as float8_e4m3fn `weight` + `weight_scale`
    [ceil(out/128), ceil(in/128)], NVFP4 as `weight_packed` + scales; config.json gets `quantization_config`
    (quant_method compressed-tensors, the resolved ignore list). llm-compressor re-saves the source's own config.json
    first, so architecture keys (num_nextn_predict_layers, ...) are the upstream ones."""
    import torch

    with torch.no_grad(), library_output():
        quantized.model.save_pretrained(folder, save_compressed=True, max_shard_size=max_shard_size)
    qc = read_json(folder / "config.json").get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors" or qc.get("quantization_status") != "compressed":
        raise CheckFailed(f"{folder / 'config.json'}: llm-compressor wrote no compressed quantization_config "
                          f"(quant_method {qc.get('quant_method')!r}, status {qc.get('quantization_status')!r}); "
                          "the model was not calibrated by the llmcompressor engine in this process")
    if (folder / LLMC_RECIPE).exists():
        (folder / LLMC_RECIPE).rename(folder / LLMC_RECIPE_KEPT)
