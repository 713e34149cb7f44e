"""Trainers: reinforcement learning from scratch (PPO, PPO + RND for the AGV warehouse)."""
