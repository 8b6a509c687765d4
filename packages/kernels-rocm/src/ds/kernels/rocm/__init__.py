"""ds-kernels-rocm: ds's fused kernels for AMD GPUs, found at run time through the ``ds.plugins`` entry point.

The kernels are ds-kernels-cuda's sources compiled with HIP, and so is the Python around
them (the modules next to this one are links to that package's). PyTorch's ROCm builds
call their devices ``cuda``, so the same launchers serve. Importing this package never
loads the compiled extension ``ds.kernels.rocm._C``.
"""
