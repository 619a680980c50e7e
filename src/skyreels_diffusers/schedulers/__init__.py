from .scheduling_flow_euler import SkyReelsV3FlowEulerScheduler
from .scheduling_flow_unipc import SkyReelsV3FlowUniPCScheduler


__all__ = ["SkyReelsV3FlowEulerScheduler", "SkyReelsV3FlowUniPCScheduler"]
