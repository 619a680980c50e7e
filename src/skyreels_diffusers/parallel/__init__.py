from .context_parallel import enable_context_parallel, init_distributed, is_main_process

__all__ = ["enable_context_parallel", "init_distributed", "is_main_process"]
