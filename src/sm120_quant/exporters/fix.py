"""`quantize fix`: write a repaired copy of a checkpoint; the input is never modified.

Runs `check_checkpoint`, then repairs what can be repaired without the original calibration:

- fused-scales: unify each fused group's global scale to the max (and its input scale to the max), dequantize the
  members whose scale changes and re-derive their block scales and FP4 codes against the shared scale; the added
  error (relative Frobenius norm of the dequantized weight before vs after) is reported per tensor.
- kv-scale-names: rename k/v scales to `self_attn.k_scale` / `v_scale`, which every runtime version remaps to
  `self_attn.attn.*` and no stacked q/k/v mapping touches.
- kv-scales / kv-scales-mla: drop k/v scales the config does not declare, and MLA k/v scales (with their
  declaration: the runtime then keeps a BF16 KV cache unless told otherwise).
- block-scales: NaN E4M3 block-scale bytes become 448 (the overflow they came from saturates instead of poisoning).
- bf16-not-excluded / mtp-not-excluded / excluded-scales: add BF16 modules to the exclude list(s); drop leftover
  scale tensors of excluded BF16 modules.
- mtp-missing / mtp-quantized (with `source`): copy the BF16 MTP layer from the source checkpoint and exclude it.
- router: store the router correction bias in fp32 (copied from `source` when given).

Files and tensors that no repair touches are copied byte for byte. The copy is written to a temporary sibling folder
and renamed into place when complete.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sm120_quant.errors import UserError
from sm120_quant.exporters.check import (
    HF_QUANT_CONFIG,
    INDEX_NAME,
    KV_SCALE_LEAVES,
    QUANT_LEAVES,
    CheckContext,
    CheckReport,
    Finding,
    Layout,
    Role,
    Rule,
    check_checkpoint,
    fused_groups,
    is_mla,
    is_nvfp4,
    layer_of,
    load_checkpoint,
    param,
    read_json,
)
from sm120_quant.exporters.mtp import MTP_SHARD
from sm120_quant.exporters.safetensors_header import RawTensor, TensorInfo, read_header, write_safetensors

FIXABLE: tuple[Rule, ...] = (
    Rule.FUSED_SCALES, Rule.BLOCK_SCALES, Rule.KV_SCALE_NAMES, Rule.KV_SCALES, Rule.KV_SCALES_MLA,
    Rule.NOT_EXCLUDED, Rule.MTP_NOT_EXCLUDED, Rule.EXCLUDED_SCALES, Rule.MTP_MISSING, Rule.MTP_QUANTIZED, Rule.ROUTER,
)
_E4M3_448 = 0x7E


@dataclass(frozen=True)
class FixAction:
    rule: Rule
    key: str
    action: str
    added_error: float | None = None  # ||W_after - W_before||_F / ||W_before||_F of the dequantized weight


@dataclass(frozen=True)
class FixResult:
    path: Path
    out: Path
    actions: tuple[FixAction, ...]
    unfixed: tuple[Finding, ...]  # findings of the input that no selected repair addresses
    after: CheckReport

    @property
    def max_added_error(self) -> float | None:
        errors = [a.added_error for a in self.actions if a.added_error is not None]
        return max(errors) if errors else None

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "out": str(self.out), "max_added_error": self.max_added_error,
            "actions": [{"rule": a.rule.value, "key": a.key, "action": a.action, "added_error": a.added_error}
                        for a in self.actions],
            "unfixed": [{"level": f.level.value, "rule": f.rule.value, "key": f.key, "message": f.message}
                        for f in self.unfixed],
            "after": self.after.to_dict(),
        }


class _Plan:
    """The edits, applied to the output in one pass. Tensor contents go through `get` so repairs compose (a NaN
    block scale is clamped before its fused group is re-quantized)."""

    def __init__(self, ctx: CheckContext):
        self.ctx = ctx
        self.replace: dict[str, RawTensor] = {}
        self.drop: set[str] = set()
        self.rename: dict[str, str] = {}
        self.add: dict[str, RawTensor] = {}
        self.exclude: list[str] = []
        self.clear_kv_declaration = False
        self.actions: list[FixAction] = []
        self._torch: dict[str, object] = {}

    def get(self, name: str):
        if name not in self._torch:
            self._torch[name] = self.ctx.tensor(self.ctx.ckpt.tensors[name])
        return self._torch[name]

    def put(self, name: str, t) -> None:
        self._torch[name] = t
        self.replace[name] = RawTensor.from_torch(name, t)

    def act(self, rule: Rule, key: str, action: str, added_error: float | None = None) -> None:
        self.actions.append(FixAction(rule, key, action, added_error))


def fix_checkpoint(path: Path, out: Path, only: Iterable[str] | None = None, source: Path | None = None,
                   runtime: str | None = None, tp: int | None = None) -> FixResult:
    """Write a repaired copy of `path` to `out` (which must not exist) and check the copy."""
    path, out = Path(path), Path(out)
    selected = _selected(only)
    if out.exists():
        raise UserError(f"--out {out}: already exists; fix never overwrites, choose a new folder")
    if out.resolve().is_relative_to(path.resolve()):
        raise UserError(f"--out {out}: must not be inside the checkpoint being fixed")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: parent folder {out.parent} does not exist")
    source_tensors = _source_tensors(Path(source)) if source is not None else None

    deep = Rule.BLOCK_SCALES in selected
    before = check_checkpoint(path, runtime, tp, deep)
    ckpt = load_checkpoint(path)
    ctx = CheckContext(ckpt, None, tp, deep)
    try:
        plan = _Plan(ctx)
        found = before.rules() & selected
        for rule, repair in _REPAIRS:
            if rule in found:
                repair(plan, source_tensors)
        repaired = {a.rule for a in plan.actions}
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            _write(ctx, plan, source_tensors, tmp)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        ctx.close()
    after = check_checkpoint(out, runtime, tp, deep)
    unfixed = tuple(f for f in before.findings if f.rule not in repaired)
    return FixResult(path, out, tuple(plan.actions), unfixed, after)


def _selected(only: Iterable[str] | None) -> set[Rule]:
    if only is None:
        return set(FIXABLE)
    valid = {r.value: r for r in FIXABLE}
    chosen = set()
    for name in only:
        if name not in valid:
            raise UserError(f"--only {name!r}: not a repairable rule; choose from {', '.join(valid)}")
        chosen.add(valid[name])
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# Repairs


def _fix_fused_scales(plan: _Plan, _source) -> None:
    from sm120_quant.quantize.formats import dequantize_nvfp4, quantize_nvfp4

    ctx = plan.ctx
    if not is_nvfp4(ctx.layout):
        return
    reciprocal = ctx.layout is Layout.CT_NVFP4  # compressed-tensors stores 1/scale
    weight_leaf = param(ctx.layout, Role.WEIGHT).leaf
    glob_leaf = param(ctx.layout, Role.GLOBAL_SCALE).leaf
    in_leaf = param(ctx.layout, Role.INPUT_SCALE).leaf
    for _, _, members in fused_groups(ctx):
        if not all(m.quantized and not m.excluded for m in members):
            continue
        names = [m.name for m in members]
        if not all(f"{n}.{leaf}" in ctx.ckpt.tensors for n in names for leaf in (weight_leaf, "weight_scale",
                                                                               glob_leaf, in_leaf)):
            continue
        stored = {n: plan.get(f"{n}.{glob_leaf}") for n in names}
        if any(s.numel() != 1 for s in stored.values()):
            continue  # a dtype/shape finding, not something to unify
        scale = {n: (1.0 / s.float() if reciprocal else s.float()).reshape(()) for n, s in stored.items()}
        if not all(math.isfinite(float(v)) and float(v) > 0 for v in scale.values()):
            continue  # a zero or non-finite scale (scalar-scales) cannot be unified with anything
        target_name = max(names, key=lambda n: float(scale[n]))
        target = scale[target_name]
        for n in names:
            if float(scale[n]) == float(target):
                continue
            try:
                before = dequantize_nvfp4(plan.get(f"{n}.{weight_leaf}"), plan.get(f"{n}.weight_scale"), scale[n])
                q = quantize_nvfp4(before, target)
            except ValueError as e:
                raise UserError(f"{n}: cannot re-quantize ({e}); fix the tensors it names first") from None
            after = dequantize_nvfp4(q.packed, q.block_scale, target)
            error = float((after - before).norm() / before.norm()) if before.norm() > 0 else 0.0
            plan.put(f"{n}.{weight_leaf}", q.packed)
            plan.put(f"{n}.weight_scale", q.block_scale)
            plan.put(f"{n}.{glob_leaf}", stored[target_name].clone().reshape(stored[n].shape))
            plan.act(Rule.FUSED_SCALES, n, f"re-quantized against the shared global scale of {target_name}",
                     added_error=error)
        inputs = {n: plan.get(f"{n}.{in_leaf}") for n in names}
        pick = (min if reciprocal else max)(inputs.values(), key=lambda t: float(t.float().reshape(-1)[0]))
        for n, t in inputs.items():
            if float(t.float().reshape(-1)[0]) != float(pick.float().reshape(-1)[0]):
                plan.put(f"{n}.{in_leaf}", pick.clone().reshape(t.shape).to(t.dtype))
                plan.act(Rule.FUSED_SCALES, f"{n}.{in_leaf}", "set to the group's largest input scale")


def _fix_block_scales(plan: _Plan, _source) -> None:
    import torch

    from sm120_quant.quantize.formats import e4m3_nan_bytes

    ctx = plan.ctx
    for m in ctx.modules.values():
        ref = m.params.get("weight_scale")
        if ref is None or ref.info.dtype != "F8_E4M3":
            continue
        name = ref.info.name
        scale = plan.get(name)
        nan = e4m3_nan_bytes(scale)
        count = int(nan.sum())
        if count:
            fixed = scale.clone()
            fixed.view(torch.uint8)[nan] = _E4M3_448
            plan.put(name, fixed)
            plan.act(Rule.BLOCK_SCALES, name, f"{count} NaN block scale(s) set to 448")


def _kv_names(ctx: CheckContext) -> list[str]:
    leaves = tuple("." + k for k in KV_SCALE_LEAVES)
    return [n for n in ctx.ckpt.tensors if n.endswith(leaves)]


_KV_RENAMES = (
    (re.compile(r"\.self_attn\.([kv])_proj\.([kv])_scale$"), r".self_attn.\2_scale"),
    (re.compile(r"\.self_attn\.attn\.([kv])_scale$"), r".self_attn.\1_scale"),
)


def _fix_kv_names(plan: _Plan, _source) -> None:
    if is_mla(plan.ctx.ckpt.config):
        return
    for name in _kv_names(plan.ctx):
        for pattern, repl in _KV_RENAMES:
            new = pattern.sub(repl, name)
            if new != name:
                plan.rename[name] = new
                plan.act(Rule.KV_SCALE_NAMES, name, f"renamed to {new}")
                break


def _fix_kv_undeclared(plan: _Plan, _source) -> None:
    if plan.ctx.ckpt.quant.kv_cache is not None:
        return  # declared but missing: only a new calibration helps
    for name in _kv_names(plan.ctx):
        plan.drop.add(name)
        plan.act(Rule.KV_SCALES, name, "dropped: the config declares no KV cache quantization")


def _fix_kv_mla(plan: _Plan, _source) -> None:
    if not is_mla(plan.ctx.ckpt.config):
        return
    for name in _kv_names(plan.ctx):
        plan.drop.add(name)
        plan.act(Rule.KV_SCALES_MLA, name, "dropped (calibrated on decompressed K/V, not the cached latent)")
    if plan.ctx.ckpt.quant.kv_cache is not None:
        plan.clear_kv_declaration = True
        plan.act(Rule.KV_SCALES_MLA, "kv_cache_quant_algo", "cleared: the KV cache stays BF16 unless the server "
                 "is started with --kv-cache-dtype fp8")


def _layer_entry(ctx: CheckContext, layer: int) -> str:
    """The exclude entry for a whole layer, in the syntax of the checkpoint's exclude list."""
    return f"model.layers.{layer}*" if ctx.layout is Layout.MODELOPT_NVFP4 else rf"re:model\.layers\.{layer}\..*"


def _bf16_unexcluded(ctx: CheckContext, mtp: bool) -> list[str]:
    return [m.name for m in ctx.modules.values()
            if m.mtp == mtp and not m.excluded and not m.quantized
            and m.fweight is not None]


def _fix_not_excluded(plan: _Plan, _source) -> None:
    for name in _bf16_unexcluded(plan.ctx, mtp=False):
        plan.exclude.append(name)
        plan.act(Rule.NOT_EXCLUDED, name, f"added to {plan.ctx.ckpt.quant.exclude_key}")


def _fix_mtp_not_excluded(plan: _Plan, _source) -> None:
    ctx = plan.ctx
    for layer in sorted({layer_of(n) for n in _bf16_unexcluded(ctx, mtp=True)}):
        entry = _layer_entry(ctx, layer)
        if entry not in plan.exclude:
            plan.exclude.append(entry)
            plan.act(Rule.MTP_NOT_EXCLUDED, f"model.layers.{layer}", f"added '{entry}' to "
                     f"{ctx.ckpt.quant.exclude_key}")


def _fix_excluded_scales(plan: _Plan, _source) -> None:
    ctx = plan.ctx
    for m in ctx.modules.values():
        if m.excluded and m.fweight is not None:
            for leaf, ref in m.params.items():
                if leaf in QUANT_LEAVES:
                    plan.drop.add(ref.info.name)
                    plan.act(Rule.EXCLUDED_SCALES, ref.info.name, "dropped: the module is excluded and BF16")


def _fix_mtp(plan: _Plan, source: Mapping[str, tuple[Path, TensorInfo]] | None) -> None:
    ctx = plan.ctx
    if source is None or any(a.rule in (Rule.MTP_MISSING, Rule.MTP_QUANTIZED) for a in plan.actions):
        return
    for layer in ctx.ckpt.mtp_layers:
        prefix = f"model.layers.{layer}."
        copied = {n: v for n, v in source.items() if n.startswith(prefix)}
        if not copied:
            raise UserError(f"--source: has no {prefix}* tensors to copy; point it at the BF16 checkpoint the "
                            "export was made from")
        existing = [n for n in ctx.ckpt.tensors if n.startswith(prefix)]
        rule = Rule.MTP_QUANTIZED if existing else Rule.MTP_MISSING
        plan.drop.update(existing)
        for n, (file, info) in copied.items():
            plan.add[n] = RawTensor.from_file(file, info)
        entry = _layer_entry(ctx, layer)
        if not ctx.excluded(prefix + "self_attn.o_proj") and entry not in plan.exclude:
            plan.exclude.append(entry)
        plan.act(rule, prefix + "*", f"copied {len(copied)} BF16 tensors from the source into "
                                      f"{_mtp_file(ctx.ckpt)} (replacing {len(existing)}) and excluded the layer")


def _fix_router(plan: _Plan, source: Mapping[str, tuple[Path, TensorInfo]] | None) -> None:
    import torch

    for name, ref in plan.ctx.ckpt.tensors.items():
        if not name.endswith(".mlp.gate.e_score_correction_bias") or ref.info.dtype == "F32":
            continue
        if source is not None and name in source and source[name][1].dtype == "F32":
            file, info = source[name]
            plan.replace[name] = RawTensor.from_file(file, info)
            plan.act(Rule.ROUTER, name, "copied the fp32 bias from the source")
        else:
            plan.put(name, plan.get(name).to(torch.float32))
            plan.act(Rule.ROUTER, name, f"cast {ref.info.dtype} -> F32 (the lost precision needs --source)")


_REPAIRS = (
    (Rule.BLOCK_SCALES, _fix_block_scales),
    (Rule.FUSED_SCALES, _fix_fused_scales),
    (Rule.KV_SCALE_NAMES, _fix_kv_names),
    (Rule.KV_SCALES, _fix_kv_undeclared),
    (Rule.KV_SCALES_MLA, _fix_kv_mla),
    (Rule.MTP_MISSING, _fix_mtp),
    (Rule.MTP_QUANTIZED, _fix_mtp),
    (Rule.NOT_EXCLUDED, _fix_not_excluded),
    (Rule.MTP_NOT_EXCLUDED, _fix_mtp_not_excluded),
    (Rule.EXCLUDED_SCALES, _fix_excluded_scales),
    (Rule.ROUTER, _fix_router),
)


def _source_tensors(source: Path) -> dict[str, tuple[Path, TensorInfo]]:
    if not source.is_dir():
        raise UserError(f"--source {source}: not a checkpoint folder")
    if (source / INDEX_NAME).is_file():
        weight_map = read_json(source / INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise UserError(f"--source {source / INDEX_NAME}: weight_map is not a map of tensor names to files")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in source.glob("*.safetensors"))
    if not files:
        raise UserError(f"--source {source}: no safetensors files")
    tensors = {}
    for f in files:
        header = read_header(source / f)
        tensors |= {n: (source / f, info) for n, info in header.tensors.items()}
    return tensors


# ---------------------------------------------------------------------------------------------------------------
# Writing the copy


def _mtp_file(ckpt) -> str:
    """Where copied MTP tensors go: a shard of their own (named as the exporter names it) when an index lists the
    shards, else the single file (a second file would need an index the checkpoint does not have)."""
    return MTP_SHARD if ckpt.index is not None else next(iter(ckpt.headers))


def _write(ctx: CheckContext, plan: _Plan, source, tmp: Path) -> None:
    ckpt = ctx.ckpt
    mtp_new = bool(plan.add)
    target_of_new = _mtp_file(ckpt)
    touched = {ckpt.tensors[n].file for n in (*plan.replace, *plan.drop, *plan.rename)}
    if mtp_new:
        touched.add(target_of_new)
    weight_map: dict[str, str] = {}
    for file, header in ckpt.headers.items():
        if file not in touched:
            shutil.copyfile(ckpt.path / file, tmp / file)
            weight_map |= dict.fromkeys(header.tensors, file)
            continue
        tensors = []
        for info in sorted(header.tensors.values(), key=lambda i: i.start):
            if info.name in plan.drop:
                continue
            raw = plan.replace.get(info.name) or RawTensor.from_file(ckpt.path / file, info)
            name = plan.rename.get(info.name, info.name)
            tensors.append(RawTensor(name, raw.dtype, raw.shape, raw.data, raw.source, raw.source_info))
        if file == target_of_new:
            tensors.extend(plan.add.values())
        write_safetensors(tmp / file, tensors, header.metadata)
        weight_map |= dict.fromkeys((t.name for t in tensors), file)
    if mtp_new and target_of_new not in ckpt.headers:
        write_safetensors(tmp / target_of_new, plan.add.values(), {"format": "pt"})
        weight_map |= dict.fromkeys(plan.add, target_of_new)

    written = {"config.json", HF_QUANT_CONFIG, INDEX_NAME, *ckpt.headers, target_of_new}
    for item in ckpt.path.iterdir():
        if item.name in written:
            continue
        if item.is_dir():
            shutil.copytree(item, tmp / item.name)
        else:
            shutil.copy2(item, tmp / item.name)
    _write_json_files(ckpt, plan, tmp)
    if ckpt.index is not None:
        if touched:
            index = dict(ckpt.index)
            headers = (read_header(tmp / f) for f in sorted(set(weight_map.values())))
            total = sum(h.file_size - h.data_start for h in headers)
            index["metadata"] = dict(index.get("metadata") or {}, total_size=total)
            index["weight_map"] = dict(sorted(weight_map.items()))
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copy2(ckpt.path / INDEX_NAME, tmp / INDEX_NAME)


def _write_json_files(ckpt, plan: _Plan, tmp: Path) -> None:
    config = json.loads(json.dumps(ckpt.config))
    hf_quant = json.loads(json.dumps(ckpt.hf_quant_config)) if ckpt.hf_quant_config is not None else None
    changed = bool(plan.exclude) or plan.clear_kv_declaration
    qc = config.get("quantization_config")
    legacy = hf_quant.get("quantization") if hf_quant is not None else None
    if plan.exclude:
        if qc is not None:
            qc["ignore"] = list(qc.get("ignore") or []) + [e for e in plan.exclude if e not in (qc.get("ignore") or [])]
        if legacy is not None:
            old = list(legacy.get("exclude_modules") or [])
            legacy["exclude_modules"] = old + [e for e in plan.exclude if e not in old]
    if plan.clear_kv_declaration:
        if qc is not None and "kv_cache_scheme" in qc:
            qc["kv_cache_scheme"] = None
        if legacy is not None:
            legacy["kv_cache_quant_algo"] = None
    for name, data, original in (("config.json", config, ckpt.config), (HF_QUANT_CONFIG, hf_quant,
                                                                         ckpt.hf_quant_config)):
        if original is None:
            continue
        if changed:
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copy2(ckpt.path / name, tmp / name)

