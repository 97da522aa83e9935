"""Copy the MTP (multi-token prediction) layer back into an export.

GLM stores its MTP layer as decoder layer `model.layers.{num_hidden_layers}.*`; transformers drops it at load, so
neither ModelOpt nor llm-compressor writes it, while config.json keeps `num_nextn_predict_layers`. Speculative
decoding in vLLM/SGLang then fails or silently loses its draft head. We copy the source's tensors byte for byte into
a shard of their own, list it in the index and exclude the layer from quantization.
"""

from __future__ import annotations

from pathlib import Path

from sm120_quant.exporters.checkpoint import INDEX, add_exclusions, read_json, write_json
from sm120_quant.models.load import SourceCheckpoint

MTP_SHARD = "model-mtp.safetensors"


def mtp_prefixes(source: SourceCheckpoint) -> list[str]:
    first = source.num_hidden_layers
    return [f"model.layers.{first + i}." for i in range(source.mtp_layers)]


def copy_mtp_layers(source: SourceCheckpoint, folder: Path) -> int:
    """Returns the number of tensors copied (0 when the source has no MTP layer)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    prefixes = mtp_prefixes(source)
    if not prefixes:
        return 0
    tensors = {}
    for shard in sorted(source.folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                if key.startswith(tuple(prefixes)):
                    tensors[key] = f.get_tensor(key)
    if not tensors:
        return 0
    save_file(dict(sorted(tensors.items())), folder / MTP_SHARD, metadata={"format": "pt"})
    _index_shard(folder, MTP_SHARD, list(tensors))
    add_exclusions(folder, [p.rstrip(".") + "*" for p in prefixes])
    return len(tensors)


def _index_shard(folder: Path, shard: str, keys: list[str]) -> None:
    """Add `shard`'s keys to the index, creating one for a single-file export (runtimes load only indexed shards
    once an index exists, and need one to find a second file)."""
    from safetensors import safe_open

    index_path = folder / INDEX
    if index_path.exists():
        index = read_json(index_path)
    else:
        index = {"metadata": {}, "weight_map": {}}
        for existing in sorted(folder.glob("*.safetensors")):
            if existing.name == shard:
                continue
            with safe_open(existing, "pt") as f:
                index["weight_map"].update({k: existing.name for k in f.keys()})
    index["weight_map"].update({k: shard for k in keys})
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    index["metadata"]["total_size"] = sum(_data_bytes(p) for p in folder.glob("*.safetensors"))
    write_json(index_path, index)


def _data_bytes(shard: Path) -> int:
    """Tensor bytes of a shard (what the index's total_size counts): file size less the 8-byte length and header."""
    with shard.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    return shard.stat().st_size - 8 - header_len
