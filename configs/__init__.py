"""Hydra configs, one file per command plus groups (env/, ...); installed as robodistill.configs."""

from hydra.core.config_store import ConfigStore


def register_schemas() -> None:
    """Typed schemas the yaml files build on, so a misspelled or mistyped field is an error."""
    from robodistill.demos import DemosConfig
    from robodistill.deploy.controller import ControlConfig
    from robodistill.deploy.export import ExportConfig
    from robodistill.deploy.server import ServeConfig
    from robodistill.envs.factory import EnvConfig
    from robodistill.evaluation import EvalConfig
    from robodistill.inference.latency import BenchLatencyConfig
    from robodistill.training.distill import DistillConfig
    from robodistill.training.rpd import RPDConfig
    from robodistill.training.teacher import TrainTeacherConfig
    from robodistill.training.ppo_rnd import AGVTrainConfig

    store = ConfigStore.instance()
    store.store(group="schema", name="env", node=EnvConfig)
    store.store(group="schema", name="eval", node=EvalConfig)
    store.store(group="schema", name="demos", node=DemosConfig)
    store.store(group="schema", name="train-teacher", node=TrainTeacherConfig)
    store.store(group="schema", name="agv_train", node=AGVTrainConfig)
    store.store(group="schema", name="distill", node=DistillConfig)
    store.store(group="schema", name="bench-latency", node=BenchLatencyConfig)
    store.store(group="schema", name="export", node=ExportConfig)
    store.store(group="schema", name="serve", node=ServeConfig)
    store.store(group="schema", name="control", node=ControlConfig)
    store.store(group="schema", name="rpd", node=RPDConfig)
