"""Offline critics for RL-100 on chunk-level transitions: IQL, a dynamics ensemble, and two OPE
estimators (AM-Q and FQE).

The decision process is the one the policy acts in: a state is the normalised observation history
(obs_horizon frames, flattened), an action is the executed part of a chunk in the policy's
normalised action space (act_horizon x A, flattened), a transition spans the chunk's env steps.
The reward is sparse: gamma ** j on the transition whose j-th env step (from 0) first solves the
task, which also ends the episode. gamma applies per env step, so a transition's `discount` is
gamma to the number of env steps it spans (act_horizon, fewer where an episode ends mid-chunk) and a
Q value is the chance of success discounted by the env steps it takes, what `gate_truth` measures.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from robodistill.data.trajectories import Episode
from robodistill.data.windows import hold_still, take_padded
from robodistill.policies.diffusion.chain import DenoisingChain


def mlp(inp: int, out: int, hidden: tuple[int, ...] = (256, 256)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(inp, h), nn.LayerNorm(h), nn.Mish()]
        inp = h
    return nn.Sequential(*layers, nn.Linear(inp, out))


@dataclass
class Transitions:
    state: torch.Tensor  # (N, S) normalised observation history
    action: torch.Tensor  # (N, act_horizon * A) normalised executed chunk
    reward: torch.Tensor  # (N,)
    discount: torch.Tensor  # (N,) gamma ** (env steps the transition spans): what V(next_state) is worth
    next_state: torch.Tensor  # (N, S)
    done: torch.Tensor  # (N,) 1 where the task was solved (no bootstrap)
    first: torch.Tensor  # (N,) bool: the episode's first decision (OPE start states)

    def __len__(self) -> int:
        return len(self.reward)

    @classmethod
    def from_episodes(cls, episodes: list[Episode], chain: DenoisingChain, delta_actions: bool, gamma: float) -> "Transitions":
        """Every env step of every episode as a decision point (overlapping chunks: more data),
        episodes cut at their first success. Needs per-step success (`Episode.step_success`)."""
        policy = chain.policy
        h, oh = policy.cfg.act_horizon, policy.obs_horizon
        rows: dict[str, list] = {k: [] for k in ("state", "action", "reward", "discount", "next_state", "done", "first")}
        for ep in episodes:
            if ep.step_success is None:
                raise ValueError(f"{ep.source}, episode {ep.episode_id}: no per-step 'success' recorded; RL-100 needs it for the reward")
            solved = np.flatnonzero(ep.step_success)
            end = int(solved[0]) + 1 if len(solved) else len(ep)  # actions taken
            states = np.asarray(ep.obs["state"][: end + 1], dtype=np.float32)
            acts = ep.actions[:end]
            hold = hold_still(acts)
            for t in range(end):
                stop = min(t + h, end)
                rows["state"].append(take_padded(states, t - oh + 1, t + 1))
                rows["action"].append(take_padded(acts, t, t + h, pad_after=hold if delta_actions else None))
                rows["next_state"].append(take_padded(states, stop - oh + 1, stop + 1))
                hit = bool(len(solved)) and stop == end
                rows["reward"].append(gamma ** (stop - t - 1) if hit else 0.0)
                rows["discount"].append(gamma ** (stop - t))
                rows["done"].append(float(hit))
                rows["first"].append(t == 0)
        with torch.no_grad():
            norm_s = policy.normalizers["state"].cpu()
            norm_a = policy.normalizers["actions"].cpu()
            state = norm_s(torch.as_tensor(np.stack(rows["state"]))).flatten(1)
            next_state = norm_s(torch.as_tensor(np.stack(rows["next_state"]))).flatten(1)
            action = norm_a(torch.as_tensor(np.stack(rows["action"]))).flatten(1)
        return cls(state, action, *(torch.tensor(rows[k], dtype=torch.float32) for k in ("reward", "discount")), next_state,
                   torch.tensor(rows["done"]), torch.tensor(rows["first"]))

    def cat(self, other: "Transitions") -> "Transitions":
        return Transitions(*(torch.cat([getattr(self, k), getattr(other, k)]) for k in self.__dataclass_fields__))

    def batch(self, size: int, gen: torch.Generator) -> "Transitions":
        idx = torch.randint(len(self), (size,), generator=gen)
        return Transitions(*(getattr(self, k)[idx] for k in self.__dataclass_fields__))

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class IQL(nn.Module):
    """Implicit Q-learning critics (Kostrikov et al.): twin Q(s, a) and V(s), V fitted to an upper
    expectile of Q so no out-of-data action is ever queried."""

    def __init__(self, state_dim: int, action_dim: int, expectile: float = 0.7, tau: float = 0.005,
                 hidden: tuple[int, ...] = (256, 256)):
        super().__init__()
        self.q1, self.q2 = mlp(state_dim + action_dim, 1, hidden), mlp(state_dim + action_dim, 1, hidden)
        self.v = mlp(state_dim, 1, hidden)
        self.target = copy.deepcopy(nn.ModuleList([self.q1, self.q2])).requires_grad_(False)
        self.expectile, self.tau = expectile, tau
        self.opt = torch.optim.Adam([*self.q1.parameters(), *self.q2.parameters(), *self.v.parameters()], lr=3e-4)

    def q(self, s: torch.Tensor, a: torch.Tensor, target: bool = True) -> torch.Tensor:
        q1, q2 = self.target if target else (self.q1, self.q2)
        sa = torch.cat([s, a], -1)
        return torch.min(q1(sa), q2(sa)).squeeze(-1)

    def value(self, s: torch.Tensor) -> torch.Tensor:
        return self.v(s).squeeze(-1)

    def fit(self, data: Transitions, steps: int, batch_size: int, gen: torch.Generator) -> dict:
        for _ in range(steps):
            b = data.batch(batch_size, gen)
            with torch.no_grad():
                q_target = self.q(b.state, b.action)
                backup = b.reward + b.discount * (1 - b.done) * self.value(b.next_state)
            diff = q_target - self.value(b.state)
            weight = torch.where(diff > 0, self.expectile, 1 - self.expectile)
            v_loss = (weight * diff**2).mean()
            sa = torch.cat([b.state, b.action], -1)
            q_loss = F.mse_loss(self.q1(sa).squeeze(-1), backup) + F.mse_loss(self.q2(sa).squeeze(-1), backup)
            self.opt.zero_grad(set_to_none=True)
            (v_loss + q_loss).backward()
            self.opt.step()
            with torch.no_grad():
                for p, tp in zip(nn.ModuleList([self.q1, self.q2]).parameters(), self.target.parameters()):
                    tp.lerp_(p, self.tau)
        return {"q_loss": q_loss.item(), "v_loss": v_loss.item()}


class DynamicsEnsemble(nn.Module):
    """Members predicting (next state - state, reward, done logit) from (s, a); each rollout step
    asks a random member (the model uncertainty MOPO/RL-100 roll out through)."""

    def __init__(self, state_dim: int, action_dim: int, members: int = 5, hidden: tuple[int, ...] = (256, 256)):
        super().__init__()
        self.members = nn.ModuleList(mlp(state_dim + action_dim, state_dim + 2, hidden) for _ in range(members))
        self.opt = torch.optim.Adam(self.members.parameters(), lr=1e-3)

    def fit(self, data: Transitions, steps: int, batch_size: int, gen: torch.Generator) -> dict:
        for _ in range(steps):
            loss = 0.0
            for m in self.members:  # each member its own minibatch: a cheap bootstrap
                b = data.batch(batch_size, gen)
                out = m(torch.cat([b.state, b.action], -1))
                loss = loss + F.mse_loss(out[:, :-2], b.next_state - b.state) + F.mse_loss(out[:, -2], b.reward) \
                    + F.binary_cross_entropy_with_logits(out[:, -1], b.done)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return {"dynamics_loss": loss.item() / len(self.members)}

    @torch.no_grad()
    def step(self, s: torch.Tensor, a: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Next state and done from a random member, and the members' disagreement on the state
        change (norm of their std): large where (s, a) is far from the data the members saw."""
        outs = torch.stack([m(torch.cat([s, a], -1)) for m in self.members])  # (M, B, S + 2)
        pick = torch.randint(len(self.members), (s.shape[0],), generator=gen)
        out = outs[pick, torch.arange(s.shape[0])]
        return s + out[:, :-2], torch.sigmoid(out[:, -1]) > 0.5, outs[:, :, :-2].std(0).norm(dim=-1)


@torch.no_grad()
def greedy_actions(chain: DenoisingChain, states: torch.Tensor, seed: int, batch: int = 4096) -> torch.Tensor:
    """The chain's mean-path chunk (executed part) for normalised states; `seed` fixes x_K, so two
    policies are compared on the same noise (common random numbers)."""
    policy = chain.policy
    gen = torch.Generator().manual_seed(seed)
    out = []
    for part in states.split(batch):
        cond = policy.encoder({"state": part.view(len(part), policy.obs_horizon, -1)})
        out.append(chain.executed(chain.sample(cond, gen, deterministic=True)[0][:, -1]))
    return torch.cat(out)


@torch.no_grad()
def am_q(chain: DenoisingChain, iql: IQL, dynamics: DynamicsEnsemble, starts: torch.Tensor, horizon: int, seed: int
         ) -> tuple[float, float]:
    """AM-Q (RL-100): roll the policy's mean path out for `horizon` decisions in the learned model
    from dataset states; returns the mean of Q(s_t, pi(s_t)) and of the model's disagreement
    there, over the steps the model has not ended. The offline actor climbs this same Q, so Q
    alone rises as the policy leaves the data; the disagreement is what measures that (the gate
    subtracts it, MOPO-style)."""
    gen = torch.Generator().manual_seed(seed)
    s, alive, q_sum, u_sum, count = starts, torch.ones(len(starts)), 0.0, 0.0, 0.0
    for t in range(horizon):
        a = greedy_actions(chain, s, seed + t)
        q_sum += (iql.q(s, a) * alive).sum().item()
        count += alive.sum().item()
        s, done, disagreement = dynamics.step(s, a, gen)
        u_sum += (disagreement * alive).sum().item()
        alive = alive * (~done).float()
        if count and not alive.any():
            break
    return q_sum / max(count, 1.0), u_sum / max(count, 1.0)


def fqe(chain: DenoisingChain, data: Transitions, starts: torch.Tensor, steps: int, batch_size: int, seed: int) -> float:
    """Fitted Q evaluation: Q^pi regressed on the buffer's transitions with pi's own next actions,
    then averaged over episode start states."""
    gen = torch.Generator().manual_seed(seed)
    next_actions = greedy_actions(chain, data.next_state, seed)
    with torch.random.fork_rng():  # the same initial Q for every policy scored: the gate compares policies, not inits
        torch.manual_seed(seed)
        q = mlp(data.state.shape[1] + data.action.shape[1], 1)
    target = copy.deepcopy(q).requires_grad_(False)
    opt = torch.optim.Adam(q.parameters(), lr=3e-4)
    sync = max(1, steps // 20)  # hard target updates: the backup must reach ~horizon decisions deep
    for step in range(steps):
        if step % sync == 0:
            target.load_state_dict(q.state_dict())
        idx = torch.randint(len(data), (batch_size,), generator=gen)
        with torch.no_grad():
            nxt = target(torch.cat([data.next_state[idx], next_actions[idx]], -1)).squeeze(-1)
            backup = data.reward[idx] + data.discount[idx] * (1 - data.done[idx]) * nxt
        loss = F.mse_loss(q(torch.cat([data.state[idx], data.action[idx]], -1)).squeeze(-1), backup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return q(torch.cat([starts, greedy_actions(chain, starts, seed + 1)], -1)).mean().item()
