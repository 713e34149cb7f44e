"""Evaluate one checkpoint of ManiSkill's diffusion-policy baseline with its own code.

Run by benchmarks/teacher.py inside the baseline's virtual environment (gymnasium 0.29.1), never
imported by robodistill:

    <venv>/bin/python maniskill_dp_eval.py --baseline-dir DIR --ckpt CKPT --env-id PushCube-v1
        --episodes 100 --seed 10000 --out result.json

It builds the baseline's `Agent` with train.py's default horizons and U-Net, loads the EMA
weights (what the baseline evaluates), and runs the baseline's `evaluate` on its own
`make_eval_envs`. The only addition: episodes run in waves of `--num-envs`, and episode k is reset
with seed `seed + k`, as `robodistill eval` does, so both sides see the same initial states.
"""

import argparse
import json
import sys
import time

import numpy as np
import torch


class SeededWave:
    """The vector env whose next reset() (the one `evaluate` makes) uses the given seeds."""

    def __init__(self, envs, seeds):
        self.envs, self.seeds, self.num_envs = envs, seeds, envs.num_envs

    def reset(self):
        return self.envs.reset(seed=self.seeds)

    def step(self, action):
        return self.envs.step(action)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-dir", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--env-id", required=True)
    ap.add_argument("--control-mode", default="pd_ee_delta_pos")
    ap.add_argument("--max-episode-steps", type=int, default=100)
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--num-envs", type=int, default=10)  # train.py's num_eval_envs default
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, a.baseline_dir)
    from diffusion_policy.evaluate import evaluate
    from diffusion_policy.make_env import make_eval_envs
    from train import Agent, Args

    args = Args(env_id=a.env_id, control_mode=a.control_mode, max_episode_steps=a.max_episode_steps)
    env_kwargs = dict(control_mode=a.control_mode, reward_mode="sparse", obs_mode="state",
                      render_mode="rgb_array", max_episode_steps=a.max_episode_steps)
    n_envs = min(a.num_envs, a.episodes)
    envs = make_eval_envs(a.env_id, n_envs, "cpu", env_kwargs, dict(obs_horizon=args.obs_horizon))
    agent = Agent(envs, args)
    agent.load_state_dict(torch.load(a.ckpt, map_location="cpu")["ema_agent"])
    start = time.perf_counter()
    metrics: dict[str, list] = {}
    for wave in range(0, a.episodes, n_envs):
        seeds = [a.seed + wave + i for i in range(n_envs)]
        for k, v in evaluate(n_envs, agent, SeededWave(envs, seeds), torch.device("cpu"), "cpu").items():
            metrics.setdefault(k, []).extend(np.asarray(v).reshape(-1)[: a.episodes - wave].tolist())
    seconds = time.perf_counter() - start
    envs.close()
    out = {"episodes": len(metrics["success_once"]), "seconds": seconds,
           "params": sum(p.numel() for p in agent.noise_pred_net.parameters()),
           "success_once": int(sum(bool(x) for x in metrics["success_once"])),
           "success_at_end": int(sum(bool(x) for x in metrics["success_at_end"]))}
    with open(a.out, "w") as f:
        json.dump(out, f)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
