"""Policies: the Policy contract, a random baseline, and loading a policy by name or checkpoint."""

from robodistill.policies.base import LOADERS, Policy, load_policy, register_loader
from robodistill.policies.random import RandomPolicy
from robodistill.policies import agv  # noqa: F401,E402  (registers the agv_ppo checkpoint loader)

__all__ = ["LOADERS", "Policy", "RandomPolicy", "load_policy", "register_loader"]
