from .context_parallel import enable_context_parallel, init_distributed, is_main_process
from .encoders import broadcast_tensors, compute_on_main
from .sharding import shard_transformer, sharding_plan
from .vae import ParallelAutoencoderKLWan, enable_parallel_vae
from .xfuser import enable_xfuser_parallel


__all__ = [
    "ParallelAutoencoderKLWan",
    "broadcast_tensors",
    "compute_on_main",
    "enable_context_parallel",
    "enable_parallel_vae",
    "enable_xfuser_parallel",
    "init_distributed",
    "is_main_process",
    "shard_transformer",
    "sharding_plan",
]
