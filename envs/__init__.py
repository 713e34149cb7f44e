"""ManiSkill environments behind one factory and one vectorized-env convention."""

from robodistill.envs.factory import SUPPORTED_TASKS, EnvConfig, make_env, zero_action_holds_still
from robodistill.envs.vector import SB3View, VecEnv

__all__ = ["SUPPORTED_TASKS", "EnvConfig", "make_env", "SB3View", "VecEnv", "zero_action_holds_still"]
