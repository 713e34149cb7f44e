# The two set-up-and-go commands. Both set up everything first (idempotent, fast when done).
VENV ?= .venv
RD = $(VENV)/bin/robodistill

.PHONY: setup demo test bench

setup:
	VENV=$(VENV) scripts/setup.sh

# The main job on a small default, end to end on PushCube-v1: motion-planning demos -> their
# summary -> a Diffusion Policy teacher (6000 iterations, at most 4 minutes) -> its evaluation table
# (and videos of its first episodes) -> a one-step consistency head distilled from it (700
# iterations, at most 2 minutes) -> latency and success of every sampler (DDPM-100, DDIM-10, RTI,
# consistency) -> an ONNX bundle of the head -> a closed loop at 20 Hz through the policy server ->
# one summary table. About 8 minutes on 2 cores from a fresh clone (setup included). Every rating starts at seed 10000,
# past the demos' seeds (0 on), as the trainers' own evaluations do: a policy is rated on states it did not learn from.
DEMO_DATA = datasets/PushCube-v1/mp_n30_seed0.state.pd_ee_delta_pos.h5
LAST = ls -td runs/$(1)/*-demo | head -n1
demo: setup
	$(RD) demos env=PushCube-v1 n=30 seed=0 name=demo
	$(RD) dataset info $(DEMO_DATA)
	$(RD) train-teacher env=PushCube-v1 dataset=$(DEMO_DATA) minutes=4 iterations=6000 eval_every=0 eval_episodes=0 name=demo
	$(RD) eval env=PushCube-v1 env.max_episode_steps=100 policy=$$($(call LAST,train-teacher))/checkpoints/last.pt episodes=20 seed=10000 video=true name=demo-teacher
	$(RD) distill teacher=$$($(call LAST,train-teacher))/checkpoints/last.pt minutes=2 iterations=700 eval_episodes=0 name=demo
	$(RD) bench-latency env=PushCube-v1 ckpt=$$($(call LAST,distill))/checkpoints/last.pt episodes=20 seed=10000 calls=50 name=demo
	$(RD) export ckpt=$$($(call LAST,distill))/checkpoints/last.pt sampler=consistency steps=1 format=onnx name=demo
	$(RD) control bundle=$$($(call LAST,export))/bundle hz=20 episodes=20 seed=10000 name=demo
	$(RD) summary --name demo

# Two workers, one test file each: most tests keep one core busy. On 2 cores the suite takes ~20 minutes
# (20 min 0 s, 360 tests, from a clean clone at stop 57; setup adds ~2 minutes).
test: setup
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

bench: setup
	$(VENV)/bin/python benchmarks/env_throughput.py
