from .context_parallel import enable_context_parallel, init_distributed, is_main_process
from .xfuser import enable_xfuser_parallel

__all__ = ["enable_context_parallel", "enable_xfuser_parallel", "init_distributed", "is_main_process"]
