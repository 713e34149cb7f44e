"""Policies: the Policy contract, baselines, the Diffusion Policy, and loading by name or checkpoint."""

from robodistill.policies import agv  # noqa: F401  (registers the agv_ppo checkpoint loader)
from robodistill.policies.base import LOADERS, Policy, load_policy, register_loader
from robodistill.policies.diffusion import DiffusionConfig, DiffusionPolicy  # registers its loader
from robodistill.policies.random import RandomPolicy
from robodistill.policies.vla import policy as _vla  # noqa: F401  (registers the vla checkpoint loader)

__all__ = ["LOADERS", "DiffusionConfig", "DiffusionPolicy", "Policy", "RandomPolicy", "load_policy", "register_loader"]
