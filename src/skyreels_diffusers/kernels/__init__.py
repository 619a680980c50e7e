"""Custom GPU kernels (Triton). Importing a kernel module needs `triton`
(`pip install 'skyreels-diffusers[triton]'`; CUDA builds of torch bring it)."""
