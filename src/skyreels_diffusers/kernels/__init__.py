"""The models' own compute kernels: the 8-bit attention (Triton; importing `attention_8bit` needs `triton`,
`pip install 'skyreels-diffusers[triton]'`, CUDA builds of torch bring it) and the Hadamard rotation its inputs and
FlashAttention-3's FP8 inputs can take (`rotation`, plain PyTorch)."""
