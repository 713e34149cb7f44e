"""robodistill: train ManiSkill3 manipulation policies and distill slow teachers into fast students."""

__version__ = "0.1.0"
