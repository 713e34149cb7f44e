# The two set-up-and-go commands. Both set up everything first (idempotent, fast when done).
VENV ?= .venv
RD = $(VENV)/bin/robodistill

.PHONY: setup demo test bench

setup:
	VENV=$(VENV) scripts/setup.sh

# The main job on a small default, end to end on PushCube-v1: motion-planning demos -> their
# summary -> a Diffusion Policy teacher trained for 2 minutes -> its evaluation table (and videos
# of its first episodes) -> a one-step consistency head distilled from it -> latency and success of
# every sampler (DDPM-100, DDIM-10, RTI, consistency); then the scripted expert's table for
# comparison. About 9 minutes on 2 cores.
DEMO_DATA = datasets/PushCube-v1/mp_n20_seed0.state.pd_ee_delta_pos.h5
demo: setup
	$(RD) demos env=PushCube-v1 n=20 seed=0
	$(RD) dataset info $(DEMO_DATA)
	$(RD) train-teacher env=PushCube-v1 dataset=$(DEMO_DATA) minutes=2 iterations=4000 eval_every=0 eval_episodes=0 name=demo
	$(RD) eval env=PushCube-v1 env.max_episode_steps=100 policy=$$(ls -td runs/train-teacher/*-demo | head -n1)/checkpoints/last.pt episodes=20 video=true name=demo-teacher
	$(RD) distill teacher=$$(ls -td runs/train-teacher/*-demo | head -n1)/checkpoints/last.pt iterations=300 eval_episodes=0 name=demo
	$(RD) bench-latency env=PushCube-v1 ckpt=$$(ls -td runs/distill/*-demo | head -n1)/checkpoints/last.pt episodes=10 calls=50 name=demo
	$(RD) eval env=PushCube-v1 policy=scripted episodes=10 name=demo-scripted

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python benchmarks/env_throughput.py
