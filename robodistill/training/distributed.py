"""Data parallelism with torch.distributed: `robodistill <command> launcher=torchrun nproc=N`.

The launcher re-runs the same command under `torch.distributed.run` (torchrun), one process per
rank, with one run directory for all of them. Each rank takes its slice of every global batch,
DDP all-reduces the gradients (gloo on CPU, nccl on GPU), and rank 0 alone evaluates, logs and
writes checkpoints. With WORLD_SIZE unset the same code is a single process.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from robodistill.errors import UserError
from robodistill.training.runs import pick_device

LAUNCHABLE = ("train-teacher", "distill", "rpd")  # commands whose training loop is data-parallel


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun describes in the environment (if any); the device for this rank."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return Ranks(), pick_device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Ranks(rank, world), torch.device("cuda", local) if cuda else torch.device("cpu")


def any_rank(flag: bool, ranks: Ranks) -> bool:
    """True on every rank if it is true on one (e.g. a time budget that one rank has used up)."""
    if ranks.world == 1:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def average_gradients(module: torch.nn.Module, ranks: Ranks, *scalars: float) -> list[float]:
    """Replace every gradient of `module` by its mean over the ranks, in place, and return the
    ranks' mean of `scalars`: all in one all-reduce (for loops that step their own optimizer)."""
    if ranks.world == 1:
        return list(scalars)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads] + [torch.tensor(scalars, dtype=grads[0].dtype, device=grads[0].device)])
    dist.all_reduce(flat)
    flat /= ranks.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[offset:].tolist()


def broadcast_module(module: torch.nn.Module, ranks: Ranks) -> None:
    """Every rank takes rank 0's parameters and buffers (after rank-specific initialisation)."""
    if ranks.world > 1:
        for t in module.state_dict().values():
            dist.broadcast(t, 0)


def replicas_identical(module: torch.nn.Module, ranks: Ranks) -> bool:
    """Whether every rank holds bit-identical parameters (a sha256 of them, gathered)."""
    if ranks.world == 1:
        return True
    flat = torch.cat([p.detach().cpu().flatten() for p in module.parameters()])
    digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
    digests: list[str] = [""] * ranks.world
    dist.all_gather_object(digests, digest)
    return len(set(digests)) == 1


def finish(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launch(command: str, overrides: list[str]) -> None:
    """`launcher=torchrun nproc=N` among the overrides: run the command on N ranks under torchrun
    (without those two overrides, with one shared run directory) and exit with its status.
    Otherwise return."""
    launcher = next((o.split("=", 1)[1] for o in overrides if o.startswith("launcher=")), None)
    if launcher is None or "WORLD_SIZE" in os.environ:
        return
    if launcher != "torchrun":
        raise UserError(f"launcher={launcher}: the launcher is torchrun (or leave it out for one process)")
    if command not in LAUNCHABLE:
        raise UserError(f"launcher=torchrun runs {', '.join(LAUNCHABLE)}; `{command}` trains in one process")
    nproc = next((o.split("=", 1)[1] for o in overrides if o.startswith("nproc=")), "2")
    if not nproc.isdigit() or int(nproc) < 1:
        raise UserError(f"nproc={nproc} must be a whole number of processes >= 1")
    rest = [o for o in overrides if not o.startswith(("launcher=", "nproc="))]
    if not any(o.startswith("hydra.run.dir=") for o in rest):  # one directory, not one per rank's clock
        rest.append(f"hydra.run.dir=runs/{command}/{time.strftime('%Y-%m-%d_%H-%M-%S')}-ddp{nproc}")
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
        for line in lines:
            if line.startswith("error: ") and line not in errors:
                errors.append(line)
                print(line, file=sys.stderr, flush=True)
    code = proc.wait()
    return 2 if errors and code else code
