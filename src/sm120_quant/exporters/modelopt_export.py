"""Write a calibrated ModelOpt model in ModelOpt's unified Hugging Face format (hf_quant_config.json + NVFP4
tensors), which vLLM loads with `--quantization modelopt_fp4`."""

from __future__ import annotations

from pathlib import Path

from sm120_quant.quantize.model import QuantizedModel
from sm120_quant.quiet import library_output


def export_modelopt(quantized: QuantizedModel, folder: Path, max_shard_size: str) -> None:
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    with torch.no_grad(), library_output():
        export_hf_checkpoint(quantized.model, export_dir=folder, max_shard_size=max_shard_size)
