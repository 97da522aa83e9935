"""sm120-quant: NVFP4 and FP8-block checkpoints of MoE models that load and run correctly on SM120 GPUs."""

__version__ = "0.1.0"
