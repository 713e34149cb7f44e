# The two set-up-and-go commands. Both set up everything first (idempotent, fast when done).
VENV ?= .venv
RD = $(VENV)/bin/robodistill

.PHONY: setup demo test bench

setup:
	VENV=$(VENV) scripts/setup.sh

# The main job on a small default: a scripted expert and a random policy on PushCube-v1.
demo: setup
	$(RD) eval env=PushCube-v1 policy=scripted episodes=10 seed=0 video=true name=demo-scripted
	$(RD) eval env=PushCube-v1 policy=random episodes=10 seed=0 name=demo-random

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python benchmarks/env_throughput.py
