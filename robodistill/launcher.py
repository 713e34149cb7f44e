"""`launcher=torchrun nproc=N`: re-run a command under torchrun, one process per rank.

Kept apart from the data-parallel code (robodistill.training.distributed), which imports torch, so
that the commands that never launch (`summary`, `dataset`) do not pay for torch to learn so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

from robodistill.errors import UserError

LAUNCHABLE = ("train-teacher", "distill", "rpd")  # commands whose training loop is data-parallel


def launch(command: str, overrides: list[str]) -> None:
    """`launcher=torchrun nproc=N` among the overrides: run the command on N ranks under torchrun
    (without those two overrides, with one shared run directory) and exit with its status.
    Otherwise return (having checked that a Slurm launcher has Slurm to submit to)."""
    if "hydra/launcher=submitit_slurm" in overrides and shutil.which("srun") is None:  # else submitit's traceback, after a sweep dir
        raise UserError("hydra/launcher=submitit_slurm submits the jobs to Slurm, but this machine has no `srun`: run it where "
                        "Slurm is (a login node), or use hydra/launcher=submitit_local to run the same jobs here")
    launcher = next((o.split("=", 1)[1] for o in overrides if o.startswith("launcher=")), None)
    if "WORLD_SIZE" in os.environ:
        return
    if launcher is None:
        if any(o.startswith("nproc=") for o in overrides):  # else hydra's many lines suggesting +nproc=, which runs one process
            where = "" if command in LAUNCHABLE else f" (which runs {', '.join(LAUNCHABLE)}; `{command}` trains in one process)"
            raise UserError(f"nproc= is the number of ranks of launcher=torchrun{where}: add launcher=torchrun, or drop nproc=")
        return
    if launcher != "torchrun":
        raise UserError(f"launcher={launcher}: the launcher is torchrun (or leave it out for one process)")
    if command not in LAUNCHABLE:
        raise UserError(f"launcher=torchrun runs {', '.join(LAUNCHABLE)}; `{command}` trains in one process")
    if {"-m", "--multirun"} & set(overrides):  # every rank would run the whole sweep, and its second job's process
        # group finds the first's addresses in torchrun's store: a gloo connection traceback after the first job
        raise UserError(f"launcher=torchrun runs one run, not a sweep (-m): start one per setting, e.g. "
                        f"`for s in 0 1 2; do robodistill {command} seed=$s launcher=torchrun ...; done`")
    nproc = next((o.split("=", 1)[1] for o in overrides if o.startswith("nproc=")), "2")
    if not nproc.isdigit() or int(nproc) < 1:
        raise UserError(f"nproc={nproc} must be a whole number of processes >= 1")
    rest = [o for o in overrides if not o.startswith(("launcher=", "nproc="))]
    if not any(o.startswith("hydra.run.dir=") for o in rest):  # one directory, not one per rank's clock; named as
        # configs/common.yaml names it, so that resume=true and `summary --name` find the run by its name
        rest.append(f"hydra.run.dir='runs/{command}/{time.strftime('%Y-%m-%d_%H-%M-%S')}-${{slug:${{name}}}}'")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "robodistill.cli", command, *rest]
    sys.exit(_relay(args))


def _relay(args: list[str]) -> int:
    """Run torchrun with its stderr passed through as it comes until a rank says what was wrong
    (`error: ...`); after that only such lines, once each, not the traceback torchrun adds."""
    proc = subprocess.Popen(args, stderr=subprocess.PIPE)
    errors: list[str] = []
    pending = ""
    while chunk := os.read(proc.stderr.fileno(), 65536):
        text = chunk.decode(errors="replace")
        if not errors and "error: " not in pending + text:
            sys.stderr.write(text)
            sys.stderr.flush()
            pending = text.rsplit("\n", 1)[-1]  # a line cut between two reads
            continue
        pending += text
        *lines, pending = pending.split("\n")
        # ranks' lines can interleave mid-line ("error: Aerror: A", then the newlines): each "error: " starts one
        for said in (part for line in lines for part in re.split(r"(?<=.)(?=error: )", line)):
            if said.startswith("error: ") and said not in errors:
                errors.append(said)
                print(said, file=sys.stderr, flush=True)
    code = proc.wait()
    return 2 if errors and code else code
