#!/usr/bin/env bash
# The GPU path, for a machine with one NVIDIA GPU (run it where one is lent; each step stays under
# 5 minutes): teacher training on the GPU, resuming train-teacher and distill there, bench-latency with the policy on the
# GPU, the simulator on each rank's own GPU (2 ranks where 2 GPUs are), a Hugging Face VLA on the GPU, then PPO and RPD
# with sim_backend=physx_cuda and many envs in one process. Prints samples/s (teacher) and training env steps/s (PPO, RPD).
#
#     bash benchmarks/gpu_check.sh [num_envs]        (after `make setup`; OUT=/tmp/gpu_check by default)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/gpu_check}
ENVS=${1:-512}
RD="$PY -m robodistill.cli"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this script checks the GPU path'; print(torch.cuda.get_device_name())"

echo "== demos (motion planning runs on the CPU)"
timeout 300 $RD demos env=PushCube-v1 n=20 seed=0 workers=4 out="$OUT/demos" | tail -2
DATA="$OUT/demos/mp_n20_seed0.state.pd_ee_delta_pos.h5"

echo "== teacher on the GPU (U-Net, 3 minutes)"
timeout 300 $RD train-teacher env=PushCube-v1 dataset="$DATA" device=cuda policy.denoiser=unet policy.prediction_type=epsilon \
    lr=1e-4 batch_size=256 minutes=3 iterations=100000 eval_every=0 eval_episodes=20 hydra.run.dir="$OUT/teacher" | tail -3

echo "== resume on the GPU: train-teacher and distill each continue their checkpoint (RNG states read on the CPU; more saved than GPUs here)"
R="$OUT/resume"
timeout 300 $RD train-teacher env=PushCube-v1 dataset="$DATA" device=cuda iterations=200 checkpoint_every=100 eval_every=0 \
    eval_episodes=0 hydra.run.dir="$R/teacher" | tail -1
timeout 300 $RD train-teacher device=cuda iterations=400 resume_from="$R/teacher" hydra.run.dir="$R/teacher-resumed" | grep "resumed from"
# as written where two GPUs were visible (resumed with fewer: CUDA_VISIBLE_DEVICES): one CUDA RNG state more than GPUs here
cp -r "$R/teacher" "$R/teacher-2gpus"
"$PY" -c "import sys, torch; c = torch.load(sys.argv[1], weights_only=True); s = c['rng'].get('cuda', []); s.extend(s[:1]); torch.save(c, sys.argv[1])" \
    "$R/teacher-2gpus/checkpoints/last.pt"
timeout 300 $RD train-teacher device=cuda iterations=400 resume_from="$R/teacher-2gpus" hydra.run.dir="$R/teacher-2gpus-resumed" | grep "resumed from"
timeout 300 $RD distill teacher="$R/teacher-resumed/checkpoints/last.pt" device=cuda iterations=100 checkpoint_every=50 \
    eval_episodes=0 hydra.run.dir="$R/distill" | tail -1
timeout 300 $RD distill device=cuda iterations=200 resume_from="$R/distill" hydra.run.dir="$R/distill-resumed" | grep "resumed from"
# distill reads the teacher on the CPU (only its weights go to the GPU); read onto the GPU, the EMA its checkpoints carry was cuda:0's
"$PY" -c "import sys, torch; e = torch.load(sys.argv[1], weights_only=True)['ema']; d = {str(t.device) for t in e.values()}; \
print('teacher weights in the distill checkpoint were read onto:', d); assert d == {'cpu'}" "$R/distill/checkpoints/last.pt"

echo "== bench-latency with the policy on the GPU (env.sim_backend=physx_cuda: inputs on its device, each call waited for)"
timeout 300 $RD bench-latency ckpt="$OUT/teacher/checkpoints/last.pt" env.sim_backend=physx_cuda samplers='[ddim:10]' calls=50 \
    episodes=4 hydra.run.dir="$OUT/latency" | tail -2

echo "== initial states on physx_cuda: seed 10001 alone, and in a 4-env reset seeded 10000..10003 (README: not the same episode)"
"$PY" - <<'EOF'
from robodistill.envs import EnvConfig, make_env
states = []
for n in (1, 4):
    with make_env(EnvConfig(task="PushCube-v1", sim_backend="physx_cuda", num_envs=n)) as env:
        states.append(env.reset(seed=[10001 - (n > 1) + i for i in range(n)])["state"][int(n > 1)].cpu())
print(f"largest difference of the two initial states: {(states[0] - states[1]).abs().max():.4f}")
EOF

echo "== each rank simulates on its own GPU: physx_cuda:0 here; with 2 GPUs, 2 ranks on physx_cuda, then rpd on them"
cat > "$OUT/ranks_check.py" <<'EOF'
import sys

import torch

from robodistill.envs import EnvConfig, make_env
from robodistill.training.distributed import finish, setup

backend = sys.argv[1]
ranks, device = setup("cuda" if backend.startswith("physx_cuda") else "cpu")
n = 16 if backend.startswith("physx_cuda") else 1
with make_env(EnvConfig(task="PushCube-v1", sim_backend=backend, num_envs=n)) as env:
    env.reset(seed=list(range(n)))
    for _ in range(20):
        obs, *_ = env.step(torch.zeros(n, 4, device=env.device))
    sim = env._vec.base_env.backend.sim_device
    current = torch.cuda.current_device() if device.type == "cuda" else None
    print(f"rank {ranks.rank}: trains on {device}, simulates on {sim}, observations on {obs['state'].device}, "
          f"current CUDA device {current}", flush=True)
    gpu = backend.partition(":")[2]
    expected = int(gpu) if gpu else device.index  # plain physx_cuda: the rank's own GPU (one process: index None)
    if backend.startswith("physx_cuda") and expected is not None:  # and SAPIEN left torch's current device there
        assert sim.cuda_id == expected == obs["state"].device.index == current, f"not on GPU {expected}"
finish(ranks)
EOF
timeout 300 "$PY" "$OUT/ranks_check.py" physx_cuda:0
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  timeout 300 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 "$OUT/ranks_check.py" physx_cuda 2>&1 | grep "^rank"
  timeout 300 $RD rpd env=PushCube-v1 env.sim_backend=physx_cuda env.num_envs=64 device=cuda launcher=torchrun nproc=2 \
      total_steps=12800 n_steps=50 batch_size=800 eval_every=0 eval_episodes=64 obs_norm_steps=640 progress=false \
      hydra.run.dir="$OUT/rpd-2gpus" | tail -2
fi

echo "== a Hugging Face VLA runs on the env's device (a tiny Llava made here; a stand-in env: no camera needed)"
timeout 300 "$PY" - cuda "$OUT/tiny-vla" <<'EOF'
import sys
from types import SimpleNamespace

import torch

from robodistill.envs import EnvConfig
from robodistill.policies import load_policy
from tests.test_vla import tiny_llava

device, model_dir = torch.device(sys.argv[1]), sys.argv[2]
tiny_llava(model_dir, action_dim=4)
env = SimpleNamespace(cfg=EnvConfig(task="PickCube-v1", obs_mode="rgb"), device=device,  # what load_policy reads of an env
                      action_low=-torch.ones(4, device=device), action_high=torch.ones(4, device=device))
vla = load_policy(model_dir, env)
actions = vla.predict_chunk({"rgb": torch.zeros(2, 1, 32, 32, 3, dtype=torch.uint8, device=device)})
print(f"VLA weights on {vla.model.device}, actions {tuple(actions.shape)} on {actions.device}")
assert vla.model.device.type == device.type == actions.device.type
EOF

for teacher in none "$OUT/teacher/checkpoints/last.pt"; do
  echo "== rpd teacher=$teacher, physx_cuda x $ENVS envs"
  timeout 300 $RD rpd env=PushCube-v1 env.sim_backend=physx_cuda env.num_envs="$ENVS" teacher="$teacher" device=cuda \
      total_steps=$((ENVS * 50 * 20)) n_steps=50 batch_size=$((ENVS * 50 / 8)) eval_every=0 eval_episodes=100 \
      obs_norm_steps=$((ENVS * 10)) progress=false hydra.run.dir="$OUT/rpd-$([ "$teacher" = none ] && echo ppo || echo rpd)" | tail -2
done
