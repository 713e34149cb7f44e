"""AGV path planning in a continuous warehouse: differential drive, lidar rays, sparse goal reward.

`gym.make("robodistill/AGVWarehouse-v0", scene=...)` gives one robot; `make_env(EnvConfig(task=TASK,
scene=..., num_envs=B))` gives B robots stepped together in numpy behind the `VecEnv` convention.
"""

from robodistill.envs.agv.env import TASK, AGVVecEnv, AGVWarehouseEnv
from robodistill.envs.agv.scenes import SCENES

__all__ = ["SCENES", "TASK", "AGVVecEnv", "AGVWarehouseEnv"]
