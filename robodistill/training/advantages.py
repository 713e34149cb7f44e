"""Generalized advantage estimation (Schulman et al.), the one both on-policy trainers use: agv-train per env step,
rl100's online stage per decision (a chunk of env steps)."""

from __future__ import annotations

import torch


def gae(rewards, values, next_value, nonterminal, gamma, lam):
    """Generalized advantage estimates over a (T, B) rollout; nonterminal[t] masks the bootstrap from t+1."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        nxt = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        delta = rewards[t] + gamma * nxt * nonterminal[t] - values[t]
        last = delta + gamma * lam * nonterminal[t] * last
        adv[t] = last
    return adv, adv + values
