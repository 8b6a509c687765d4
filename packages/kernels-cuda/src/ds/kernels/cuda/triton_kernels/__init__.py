"""Triton kernels for ds's ops: norms, block-wise quantizers and a weight-only quantized matmul.

Triton compiles for NVIDIA and AMD GPUs alike, so ds-kernels-rocm links this folder and
offers the same kernels as ``rocm-triton``. Nothing here is imported until core chooses the
backend (:mod:`.backend`) for an op; importing this package does not import triton.

With ``TRITON_INTERPRET=1`` every kernel runs on CPU tensors through triton's interpreter,
which is how the CPU tests check them.
"""
