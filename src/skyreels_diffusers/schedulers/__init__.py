from .scheduling_flow_euler import SkyReelsV3FlowEulerScheduler

__all__ = ["SkyReelsV3FlowEulerScheduler"]
