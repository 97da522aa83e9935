"""Let ModelOpt 0.47 fake-quantize NVFP4 on CPU tensors, with `formats.fake_quant_nvfp4`.

ModelOpt's NVFP4 quantizers are "dynamic block" quantizers. Their forward reaches
`modelopt.torch.quantization.tensor_quant._dynamic_block_quantize_forward`, which calls the module global
`tensor_quant.dynamic_block_quantize_op` (the `torch.ops.tensorrt.dynamic_block_quantize_op` custom op). Its
implementation asserts `amax.is_cuda` before choosing the Triton kernel, so every NVFP4 fake-quant forward on CPU
(AWQ search, evaluating the calibrated model) fails with
`AssertionError: amax must be a CUDA tensor for dynamic block quantization.`
Max calibration itself only collects amax and does not reach it.

Why patch that module global: it is looked up at call time by its one caller, so replacing it affects exactly the
dynamic block quantizers of ModelOpt's Python forward and can be undone by putting the original back. Overriding the
op's CPU kernel through `torch.library` would instead change a process-wide registry (with a C++ warning) for every
user of the op; patching `TensorQuantizer` would also take over formats we do not implement. The replacement
forwards everything except NVFP4 on CPU (E2M1 values, E4M3 scales, blocks of 16) to ModelOpt's own op, so CUDA
tensors still run ModelOpt's Triton kernel.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from sm120_quant.quantize.formats import NVFP4_GROUP, fake_quant_nvfp4

# `_dynamic_block_quantize_forward` passes (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) as totals:
# E2M1 values are 4 bits with 2 exponent bits, E4M3 scales are 8 bits with 4 exponent bits.
_NVFP4_BITS = (4, 2, 8, 4)


class _CpuNvfp4Op:
    """Stands in for `tensor_quant.dynamic_block_quantize_op`: NVFP4 on CPU goes to `fake_quant_nvfp4`."""

    def __init__(self, modelopt_op):
        self.modelopt_op = modelopt_op

    def __call__(self, inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits):
        bits = (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)
        if (
            inputs.device.type == "cpu"
            and isinstance(amax, torch.Tensor)
            and amax.device.type == "cpu"
            and block_size == NVFP4_GROUP
            and bits == _NVFP4_BITS
        ):
            # ModelOpt reduces a per-block amax to the tensor's global amax before its kernel.
            return fake_quant_nvfp4(inputs, amax if amax.numel() == 1 else amax.amax())
        return self.modelopt_op(inputs, block_size, amax, *bits)


def enable_cpu_nvfp4_fakequant() -> None:
    """Route ModelOpt's NVFP4 fake quantization of CPU tensors to `fake_quant_nvfp4`. Calling it again does nothing."""
    from modelopt.torch.quantization import tensor_quant

    if not isinstance(tensor_quant.dynamic_block_quantize_op, _CpuNvfp4Op):
        tensor_quant.dynamic_block_quantize_op = _CpuNvfp4Op(tensor_quant.dynamic_block_quantize_op)


def disable_cpu_nvfp4_fakequant() -> None:
    """Give ModelOpt its own dynamic block op back. Calling it when not enabled does nothing."""
    from modelopt.torch.quantization import tensor_quant

    if isinstance(tensor_quant.dynamic_block_quantize_op, _CpuNvfp4Op):
        tensor_quant.dynamic_block_quantize_op = tensor_quant.dynamic_block_quantize_op.modelopt_op


@contextmanager
def cpu_nvfp4_fakequant() -> Iterator[None]:
    """`enable_cpu_nvfp4_fakequant()` for the duration of a `with` block; leaves it on if it was on before."""
    from modelopt.torch.quantization import tensor_quant

    was_enabled = isinstance(tensor_quant.dynamic_block_quantize_op, _CpuNvfp4Op)
    enable_cpu_nvfp4_fakequant()
    try:
        yield
    finally:
        if not was_enabled:
            disable_cpu_nvfp4_fakequant()
