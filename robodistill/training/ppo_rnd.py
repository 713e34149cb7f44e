"""PPO + Random Network Distillation for the AGV warehouse, CleanRL style: the math top to bottom.

Canonical RND (Burda et al.; CleanRL `ppo_rnd_envpool.py`) with MLPs
on the lidar/goal/velocity vector instead of convolutions on frames:
- a fixed random target f and a trained predictor f^ see the observation normalized by a running
  mean/var and clipped to [-5, 5]; the statistics start from random-action steps;
- intrinsic reward r_i = 1/2 ||f^(s') - f(s')||^2, divided (no mean subtraction) by the running std of
  the discounted intrinsic return, kept per env by a forward filter R <- gamma_int R + r_i;
- two value heads on one trunk; extrinsic GAE is episodic, intrinsic GAE is not (an episode's end
  is not the end of novelty); advantage = ext_coef A_ext + int_coef A_int, normalized per minibatch;
- the predictor is trained on a random `update_proportion` of each minibatch, in the same Adam step.
`combine=sum` is the AGV paper's variant: one critic on r_e + r_i. `algo=ppo` is the same PPO, no RND.

Truncated episodes bootstrap with V_ext of their final observation, so the time limit is not
mistaken for a failure. Evaluation goes through the shared `robodistill.evaluation.evaluate`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from robodistill import checkpoints
from robodistill.curves import write_run_curves
from robodistill.envs import EnvConfig, make_env
from robodistill.envs.agv import SCENES, TASK
from robodistill.envs.agv.env import REWARD_MODES
from robodistill.errors import UserError
from robodistill.evaluation import evaluate
from robodistill.policies.agv import AGVPolicy, GaussianActor, layer, normalize, payload
from robodistill.summary import counted
from robodistill.training.advantages import gae
from robodistill.training.distributed import finite_weights
from robodistill.training.runs import check_eval_episodes, check_ppo, check_unfinished, find_resume, resumed_settings, tensorboard

ALGOS = ("ppo", "ppo_rnd")
COMBINES = ("advantages", "sum")


@dataclass
class AGVTrainConfig:
    """`robodistill agv-train` (configs/agv-train.yaml)."""

    scene: str = "complex_dynamic"  # simple_static, simple_dynamic, complex_static, complex_dynamic
    algo: str = "ppo_rnd"  # ppo_rnd, or ppo (the baseline: no RND)
    combine: str = "advantages"  # advantages: 2 A_ext + 1 A_int, two value heads; sum: the paper's r_e + r_i, one critic
    reward_mode: str = "sparse"  # sparse, or dense (adds distance shaping)
    collision_penalty: float | None = None  # a collision's reward is -this; None: 1 (see README, AGV)
    total_steps: int = 1_048_576  # env steps (all robots together): 512 updates, ~4 min on one core
    seed: int = 0
    num_envs: int = 16
    num_steps: int = 128  # rollout length per env and update
    lr: float = 3e-4  # annealed linearly to 0
    # CleanRL's RND recipe: 4 x 4. 10 epochs x 8 minibatches trained 2.4x slower (1,780 vs 4,300 env steps/s on
    # one core, complex_static) for a budget that was then too small for either algorithm to reach the goal.
    update_epochs: int = 4
    num_minibatches: int = 4
    gamma: float = 0.99
    gamma_int: float = 0.99
    gae_lambda: float = 0.95
    clip_coef: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    ext_coef: float = 2.0
    int_coef: float = 1.0
    update_proportion: float = 0.25
    obs_norm_init_steps: int = 50  # random-action steps per env that seed the observation statistics
    hidden: int = 64
    rnd_hidden: int = 128
    rnd_out: int = 64
    checkpoint_every: int = 10  # updates
    eval_every: int = 10  # updates; 0: only at the end
    eval_episodes: int = 32
    resume: bool = False  # continue from the newest checkpoints/last.pt of a run with this name
    resume_from: str | None = None  # or from this run directory / checkpoint file
    progress: bool = True
    name: str = "agv"


class RunningMeanStd:
    """Parallel-algorithm running mean/var (Chan et al.), as in CleanRL and baselines."""

    def __init__(self, shape: tuple = ()):
        self.mean, self.var, self.count = torch.zeros(shape), torch.ones(shape), 1e-4

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        mean, var, n = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, total = mean - self.mean, self.count + n
        m2 = self.var * self.count + var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = (self.mean + delta * n / total).float(), (m2 / total).float(), total

    def state(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load(self, s: dict) -> None:
        self.mean, self.var, self.count = s["mean"], s["var"], s["count"]


class Agent(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.actor = GaussianActor(obs_dim, act_dim, hidden)
        self.critic = nn.Sequential(layer(obs_dim, hidden), nn.Tanh(), layer(hidden, hidden), nn.Tanh())
        self.v_ext, self.v_int = layer(hidden, 1, 1.0), layer(hidden, 1, 1.0)

    def values(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.critic(obs)
        return self.v_ext(h).squeeze(-1), self.v_int(h).squeeze(-1)


class RND(nn.Module):
    def __init__(self, obs_dim: int, hidden: int, out: int):
        super().__init__()
        act = nn.LeakyReLU
        self.target = nn.Sequential(layer(obs_dim, hidden), act(), layer(hidden, hidden), act(), layer(hidden, out, 1.0))
        self.predictor = nn.Sequential(
            layer(obs_dim, hidden), act(), layer(hidden, hidden), act(), layer(hidden, hidden), act(), layer(hidden, out, 1.0)
        )
        self.target.requires_grad_(False)

    def error(self, obs: torch.Tensor) -> torch.Tensor:
        """Per-sample mean squared error over the output features: the intrinsic reward (the spec's 1/2 ||f^(s) - f(s)||^2
        up to a constant factor, which the running-std normalisation removes) and, masked, the predictor loss. A mean,
        as in the canonical recipe: the predictor's gradient shares one norm clip with PPO's, and a sum over 64 features
        made its norm ~16x PPO's at the start (20 vs 1.2 on complex_static), shrinking the first policy updates ~15-fold."""
        return (self.predictor(obs) - self.target(obs)).pow(2).mean(-1)


def check(cfg: AGVTrainConfig) -> None:
    if cfg.scene not in SCENES:
        raise UserError(f"unknown scene '{cfg.scene}'. Valid: {', '.join(SCENES)}")
    if cfg.algo not in ALGOS:
        raise UserError(f"unknown algo '{cfg.algo}'. Valid: {', '.join(ALGOS)}")
    if cfg.reward_mode not in REWARD_MODES:
        raise UserError(f"unknown reward_mode '{cfg.reward_mode}'. Valid: {', '.join(REWARD_MODES)}")
    if cfg.combine not in COMBINES:
        raise UserError(f"unknown combine '{cfg.combine}'. Valid: {', '.join(COMBINES)}")
    if cfg.collision_penalty is not None and not cfg.collision_penalty >= 0:
        raise UserError(f"collision_penalty must be >= 0 (a collision's reward is minus it), got {cfg.collision_penalty}")
    check_eval_episodes(cfg.eval_episodes, least=1)
    check_ppo(lr=cfg.lr, gamma=cfg.gamma, gamma_int=cfg.gamma_int, gae_lambda=cfg.gae_lambda, clip_coef=cfg.clip_coef,
              max_grad_norm=cfg.max_grad_norm, update_proportion=cfg.update_proportion)
    for key in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "checkpoint_every"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{key}={getattr(cfg, key)} must be >= 1")
    batch = cfg.num_envs * cfg.num_steps
    if cfg.total_steps < batch:
        raise UserError(f"total_steps={cfg.total_steps} is less than one update (num_envs * num_steps = {batch})")
    if batch % cfg.num_minibatches:
        raise UserError(f"num_envs * num_steps = {batch} must be divisible by num_minibatches={cfg.num_minibatches}")


# What a checkpoint is a run of, besides its algorithm and scene: its networks' sizes, one intrinsic return per robot
# (num_envs), and updates of num_envs * num_steps env steps, which its step count and learning-rate schedule count in.
SHAPED = ("num_envs", "num_steps", "hidden", "rnd_hidden", "rnd_out")


def check_continues(saved: dict, cfg: AGVTrainConfig, resume_path: Path) -> None:
    """A resumed run is the run its checkpoint holds: another algo or scene is another run, and another SHAPED
    field would fail to load it (a traceback) or count its updates in other env steps (steps it never trained)."""
    shown = ["algo", "scene", *(k for k in SHAPED if saved[k] != getattr(cfg, k))]
    changed = [k for k in shown if saved[k] != getattr(cfg, k)]
    if not changed:
        return
    raise UserError(f"{resume_path} is a run of {' '.join(f'{k}={saved[k]}' for k in shown)}, not "
                    f"{' '.join(f'{k}={getattr(cfg, k)}' for k in shown)}: drop {'/'.join(f'{k}=' for k in changed)} "
                    f"to continue it as it was")


def combined_advantage(cfg: AGVTrainConfig, adv_ext: torch.Tensor, adv_int: torch.Tensor) -> torch.Tensor:
    """The advantage the policy follows with two value heads: ext_coef A_ext + int_coef A_int (Burda et al.: 2 and 1,
    so that novelty steers the policy less than the task does)."""
    return cfg.ext_coef * adv_ext + cfg.int_coef * adv_int


def resumable(path: Path) -> dict:
    """The checkpoint an agv-train run continues from."""
    ck = checkpoints.load(path)
    if ck.get("kind") != "agv_trainer":
        raise UserError(f"{path} holds a '{ck.get('kind')}', not an agv-train run's state")
    return ck


def train(cfg: AGVTrainConfig, run_dir: str | Path, saved: dict | None = None) -> dict:
    """Train into `run_dir`; returns the eval history and the paths written. `resume`/`resume_from` continue
    an earlier run's checkpoints/last.pt (`resume_from=run_dir`: in place); `saved` is that checkpoint where the
    caller has loaded it already (main, to take the run's settings from it)."""
    check(cfg)
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    resume_path = find_resume(cfg.resume, cfg.resume_from, cfg.name, run_dir)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    env_cfg = EnvConfig(task=TASK, scene=cfg.scene, num_envs=cfg.num_envs, reward_mode=cfg.reward_mode, control_mode=None,
                        collision_penalty=cfg.collision_penalty)
    env = make_env(env_cfg)
    eval_env = make_env(EnvConfig(**{**asdict(env_cfg), "num_envs": min(16, cfg.eval_episodes)}))
    obs_dim, act_dim = env.single_observation_space["state"].shape[0], env.single_action_space.shape[0]
    rnd_on = cfg.algo == "ppo_rnd"
    two_heads = rnd_on and cfg.combine == "advantages"

    agent = Agent(obs_dim, act_dim, cfg.hidden)
    rnd = RND(obs_dim, cfg.rnd_hidden, cfg.rnd_out)
    params = list(agent.parameters()) + (list(rnd.predictor.parameters()) if rnd_on else [])
    optimizer = torch.optim.Adam(params, lr=cfg.lr, eps=1e-5)
    obs_rms, int_rms = RunningMeanStd((obs_dim,)), RunningMeanStd()
    int_filter = torch.zeros(cfg.num_envs)  # discounted intrinsic return per env (the forward filter)
    batch = cfg.num_envs * cfg.num_steps
    num_updates = cfg.total_steps // batch
    if cfg.total_steps % batch:
        print(f"total_steps={cfg.total_steps} trains {num_updates * batch} env steps: whole updates of num_envs * num_steps = {batch}")
    update, history = 0, []

    if resume_path is not None:
        ck = saved if saved is not None else resumable(resume_path)
        check_continues(ck["config"], cfg, resume_path)
        agent.load_state_dict(ck["agent"])
        rnd.load_state_dict(ck["rnd"])
        optimizer.load_state_dict(ck["optimizer"])
        obs_rms.load(ck["obs_rms"])
        int_rms.load(ck["int_rms"])
        int_filter = ck["int_filter"]
        update, history = ck["update"], json.loads(ck["history"])
        checkpoints.set_rng_state(ck["rng"])
        # The robots go on in the episodes they were in, so the run makes the draws it would have made unkilled. A
        # checkpoint written before it held them starts fresh episodes, seeded by the update (repeatable, not the same).
        obs = (env.load_state(ck["env"]) if "env" in ck else env.reset(seed=cfg.seed * 100_003 + update * 1_009))["state"]
        print(f"resumed from {resume_path} at env step {ck['step']}")
    if resume_path is None:
        obs = env.reset(seed=cfg.seed * 100_003)["state"]  # robot i: seed * 100_003 + i, apart from other seeds' robots
        for _ in range(cfg.obs_norm_init_steps):
            obs_rms.update(obs)
            obs = env.step(torch.rand(cfg.num_envs, act_dim) * 2 - 1)[0]["state"]

    writer = tensorboard(run_dir, update * batch)
    bar = tqdm(total=num_updates * batch, initial=update * batch, unit="step", desc=f"{cfg.algo} {cfg.scene}", disable=not cfg.progress)
    T, B = cfg.num_steps, cfg.num_envs
    obs_buf, next_raw = torch.zeros(T, B, obs_dim), torch.zeros(T, B, obs_dim)
    act_buf, logp_buf = torch.zeros(T, B, act_dim), torch.zeros(T, B)
    rew_buf, int_buf, done_buf = torch.zeros(T, B), torch.zeros(T, B), torch.zeros(T, B)
    vext_buf, vint_buf = torch.zeros(T, B), torch.zeros(T, B)
    finished: list[dict] = []
    start = time.perf_counter()

    def evaluate_now(step: int) -> None:
        policy = AGVPolicy(agent.actor, obs_rms.mean, obs_rms.var)
        report = evaluate(policy, eval_env, cfg.eval_episodes, seed=1_000_000 + cfg.seed * 10_000, progress=False)
        s = report.summary
        row = {"step": step, "success": s["success_once"]["rate"], "success_ci95": s["success_once"]["ci95"],
               "collision": s["collision"]["rate"], "mean_return": s["mean_return"]}
        history.append(row)
        checkpoints.write_json(run_dir / "history.json", history)  # `robodistill plot` reads it while training goes on
        for k in ("success", "collision", "mean_return"):
            writer.add_scalar(f"eval/{k}", row[k], step)

    def save_state() -> None:
        checkpoints.save(ckpt_path, {
            "kind": "agv_trainer", "config": asdict(cfg), "step": update * batch, "update": update,
            "agent": agent.state_dict(), "rnd": rnd.state_dict(), "optimizer": optimizer.state_dict(),
            "obs_rms": obs_rms.state(), "int_rms": int_rms.state(), "int_filter": int_filter,
            "history": json.dumps(history), "rng": checkpoints.rng_state(), "env": env.state(),
        })

    if resume_path is None and cfg.eval_every:
        evaluate_now(0)
    while update < num_updates:
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * (1 - update / num_updates)

        # Rollout. The policy sees observations normalized with statistics frozen for the rollout.
        for t in range(T):
            x = normalize(obs, obs_rms.mean, obs_rms.var)
            with torch.no_grad():
                dist = agent.actor.dist(x)
                action = dist.sample()
                vext_buf[t], vint_buf[t] = agent.values(x)
            next_obs, reward, terminated, truncated, info = env.step(action.clamp(-1.0, 1.0))
            next_obs = next_obs["state"]
            real_next = next_obs.clone()
            if info:
                mask = info["_final_info"]
                real_next[mask] = info["final_observation"]["state"][mask]
                ep = info["final_info"]["episode"]
                finished += [{k: ep[k][i].item() for k in ep} for i in mask.nonzero().flatten().tolist()]
                cut = truncated & ~terminated
                if cut.any():
                    with torch.no_grad():
                        reward = reward + cfg.gamma * cut * agent.values(normalize(real_next, obs_rms.mean, obs_rms.var))[0]
            if rnd_on:
                with torch.no_grad():
                    int_buf[t] = rnd.error(normalize(real_next, obs_rms.mean, obs_rms.var))
            obs_buf[t], act_buf[t], logp_buf[t] = x, action, dist.log_prob(action).sum(-1)
            rew_buf[t], done_buf[t], next_raw[t] = reward, (terminated | truncated).float(), real_next
            obs = next_obs

        x_last = normalize(obs, obs_rms.mean, obs_rms.var)
        with torch.no_grad():
            next_vext, next_vint = agent.values(x_last)
        if rnd_on:
            returns_int = torch.zeros(T, B)
            for t in range(T):
                int_filter = int_filter * cfg.gamma_int + int_buf[t]
                returns_int[t] = int_filter
            int_rms.update(returns_int.reshape(-1))
            int_buf /= torch.sqrt(int_rms.var)
        ext_rewards = rew_buf + int_buf if rnd_on and not two_heads else rew_buf
        adv_ext, ret_ext = gae(ext_rewards, vext_buf, next_vext, 1.0 - done_buf, cfg.gamma, cfg.gae_lambda)
        adv_int, ret_int = gae(int_buf, vint_buf, next_vint, torch.ones_like(done_buf), cfg.gamma_int, cfg.gae_lambda)
        adv = combined_advantage(cfg, adv_ext, adv_int) if two_heads else adv_ext
        obs_rms.update(next_raw.reshape(-1, obs_dim))  # after the rollout: the predictor trains on fresh statistics
        rnd_in = normalize(next_raw.reshape(-1, obs_dim), obs_rms.mean, obs_rms.var)

        b_obs, b_act, b_logp = obs_buf.reshape(-1, obs_dim), act_buf.reshape(-1, act_dim), logp_buf.reshape(-1)
        b_adv, b_ret_ext, b_ret_int = adv.reshape(-1), ret_ext.reshape(-1), ret_int.reshape(-1)
        b_vext = vext_buf.reshape(-1)
        mb = batch // cfg.num_minibatches
        for _ in range(cfg.update_epochs):
            for idx in torch.randperm(batch).split(mb):
                dist = agent.actor.dist(b_obs[idx])
                logp = dist.log_prob(b_act[idx]).sum(-1)
                ratio = (logp - b_logp[idx]).exp()
                a = b_adv[idx]
                a = (a - a.mean()) / (a.std() + 1e-8)
                pg_loss = torch.max(-a * ratio, -a * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
                v_ext, v_int = agent.values(b_obs[idx])
                v_clipped = b_vext[idx] + (v_ext - b_vext[idx]).clamp(-cfg.clip_coef, cfg.clip_coef)
                v_loss = 0.5 * torch.max((v_ext - b_ret_ext[idx]) ** 2, (v_clipped - b_ret_ext[idx]) ** 2).mean()
                if two_heads:
                    v_loss = v_loss + 0.5 * ((v_int - b_ret_int[idx]) ** 2).mean()
                entropy = dist.entropy().sum(-1).mean()
                loss = pg_loss - cfg.ent_coef * entropy + cfg.vf_coef * v_loss
                if rnd_on:
                    keep = (torch.rand(len(idx)) < cfg.update_proportion).float()
                    forward_loss = (rnd.error(rnd_in[idx]) * keep).sum() / keep.sum().clamp(min=1.0)
                    loss = loss + forward_loss
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                finite_weights(params, f"env step {(update + 1) * batch}", cfg.lr, log_std=agent.actor.log_std)

        update += 1
        step = update * batch
        bar.update(batch)
        writer.add_scalar("losses/policy", pg_loss.item(), step)
        writer.add_scalar("losses/value", v_loss.item(), step)
        writer.add_scalar("charts/sps", (step - (update - 1) * batch) / max(time.perf_counter() - start, 1e-9), step)
        start = time.perf_counter()
        if rnd_on:
            writer.add_scalar("losses/rnd", forward_loss.item(), step)
            writer.add_scalar("charts/intrinsic_reward", int_buf.mean().item(), step)
        if finished:
            for k in ("success_once", "collision", "return"):
                writer.add_scalar(f"train/{k}", float(np.mean([f[k] for f in finished])), step)
            bar.set_postfix(refresh=False, success=f"{np.mean([f['success_once'] for f in finished]):.2f}")
            finished = []
        if (cfg.eval_every and update % cfg.eval_every == 0) or update == num_updates:
            evaluate_now(step)
        if update % cfg.checkpoint_every == 0 and update < num_updates:
            save_state()
    bar.close()
    writer.close()
    policy = payload(agent.actor, obs_rms.mean, obs_rms.var, cfg.hidden, asdict(cfg), asdict(env_cfg), update * batch)
    policy_path = checkpoints.save(run_dir / "policy.pt", policy)
    checkpoints.write_json(run_dir / "history.json", history)
    # The finished checkpoint comes after policy.pt: a run killed before that resumes from the checkpoint before and
    # writes it again, where a checkpoint at the full budget would be refused as already trained.
    save_state()
    return {"history": history, "policy": policy_path, "checkpoint": ckpt_path, "step": update * batch, "int_rms": int_rms.state()}


def main(cfg) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from robodistill.configs import given_fields

    conf = AGVTrainConfig(**OmegaConf.to_container(cfg, resolve=True))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resume_path = find_resume(conf.resume, conf.resume_from, conf.name, run_dir)
    saved = None
    if resume_path is not None:
        # A resumed run keeps its own settings (scene, algo, evaluation, ...); only what is given now changes.
        given, saved = given_fields(), resumable(resume_path)  # its kind checked before its fields are taken for this run's
        kept = resumed_settings(conf, saved["config"], tuple(k for k in AGVTrainConfig.__dataclass_fields__ if k not in ("resume", "resume_from", "name")), given)
        conf = replace(conf, **kept, resume=False, resume_from=str(resume_path))
        check_continues(saved["config"], conf, resume_path)  # before the budget, which counts in its updates
        # The budget as train() counts it: whole updates of num_envs * num_steps env steps.
        batch = conf.num_envs * conf.num_steps
        check_unfinished(resume_path, saved["step"], conf.total_steps // batch * batch, "total_steps", "env step")
    result = train(conf, run_dir, saved)
    last = result["history"][-1]
    lo, hi = last["success_ci95"]
    print(f"{conf.algo} on {conf.scene}: {result['step']} env steps, eval success {last['success']:.1%} [{lo:.1%}, {hi:.1%}] "
          f"over {counted(conf.eval_episodes, 'episode')}, collision {last['collision']:.1%}")
    print(f"policy: {result['policy']}  (robodistill eval policy={result['policy']} env=agv)")
    print(f"run: {run_dir}")
    write_run_curves(run_dir, "agv-train")
    return result
