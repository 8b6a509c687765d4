"""ds-kernels-cuda: fused CUDA kernels for ds, found at run time through the ``ds.plugins`` entry point.

You never import this package to use it: ``torch.ops.ds.rms_norm`` and the other ds ops
run its kernels on CUDA tensors once it is installed, and fall back to torch's reference
where the kernels cannot run (see :mod:`ds.kernels.cuda.plugin`). Importing it never
loads the compiled extension ``ds.kernels.cuda._C``.
"""
