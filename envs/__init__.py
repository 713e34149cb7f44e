"""ManiSkill environments behind one factory and one vectorized-env convention."""

import gymnasium as gym

from robodistill.envs.factory import AGV_TASK, SUPPORTED_TASKS, EnvConfig, make_env, zero_action_holds_still
from robodistill.envs.vector import SB3View, VecEnv

if AGV_TASK not in gym.registry:  # by name: the AGV modules load only when the env is made
    gym.register(id=AGV_TASK, entry_point="robodistill.envs.agv.env:AGVWarehouseEnv",
                 additional_wrappers=(gym.envs.registration.WrapperSpec("TakeTimeLimit", "robodistill.envs.agv.env:TakeTimeLimit", {}),))

__all__ = ["SUPPORTED_TASKS", "EnvConfig", "make_env", "SB3View", "VecEnv", "zero_action_holds_still"]
