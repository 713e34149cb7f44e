"""Diffusion Policy: config, denoisers (1-D U-Net, MLP), observation encoders, the policy module."""

from robodistill.policies.diffusion.config import DiffusionConfig
from robodistill.policies.diffusion.policy import DiffusionPolicy

__all__ = ["DiffusionConfig", "DiffusionPolicy"]
