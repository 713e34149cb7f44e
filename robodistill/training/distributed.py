"""Data parallelism with torch.distributed: `robodistill <command> launcher=torchrun nproc=N`.

The launcher (robodistill.launcher) re-runs the same command under `torch.distributed.run`
(torchrun), one process per rank, with one run directory for all of them. Each rank takes its
slice of every global batch, DDP all-reduces the gradients (gloo on CPU, nccl on GPU), and rank 0
alone evaluates, logs and writes checkpoints. With WORLD_SIZE unset the same code is a single process.

Gloo has no shared-memory transport for CPU tensors: between ranks of one host its all-reduce
goes over loopback TCP, ~4-5 ms for the 2.5 MB gradient of the MLP teacher on a 2-core machine,
half of its training step. Where all ranks share an x86 host, gradients are averaged through a
buffer in /dev/shm instead (`SharedSlots`, ~1 ms for the same gradient), as a DDP communication
hook for DDP's loops and in `average_gradients` for the loops that step their own optimizer. The
teacher's loop goes further there (`Replicas`): each rank updates only its shard of the parameters.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from robodistill.errors import UserError
from robodistill.training.runs import pick_device


class SharedSlots:
    """The ranks of one host average tensors through shared memory: each writes its tensor / world
    into its own slot, waits until every rank has (a counter per rank, spun on) and sums the slots in
    rank order (the same bits on every rank). Calls alternate between two sets of slots: a rank can
    only be one call ahead (it waited for all at the last one), so it never overwrites a slot that
    another is still reading. The counters rely on x86's ordering of stores, so other hosts and
    architectures keep gloo."""

    HEADER = 64  # bytes per rank's counter: one cache line each, so ranks do not write the same line

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.run = os.environ.get("TORCHELASTIC_RUN_ID", os.environ.get("MASTER_PORT", "0"))
        self.files, self.slot_bytes, self.generation = 0, 0, 0
        self.refused = None  # the smallest size /dev/shm had no room for: larger ones are not asked again

    @staticmethod
    def available(world: int, cuda: bool) -> bool:
        return (not cuda and int(os.environ.get("LOCAL_WORLD_SIZE", 0)) == world
                and platform.machine() in ("x86_64", "AMD64") and os.access("/dev/shm", os.W_OK))

    def _grow(self, nbytes: int) -> bool:
        """A larger buffer, made by rank 0 and mapped by all (every rank asks at the same call, as a
        collective); the file is unlinked once mapped, so nothing is left behind in /dev/shm. False on
        every rank where /dev/shm has no room for it (a container's default is 64 MB): writing past a
        full tmpfs would kill the process, so such tensors go through gloo (a DDP bucket comes back every
        step: once refused, its size is not asked again)."""
        if self.refused is not None and nbytes >= self.refused:
            return False
        slot_bytes = -(-nbytes // 64) * 64
        size = self.world * (self.HEADER + 2 * slot_bytes)
        room = torch.tensor([0.0])
        if self.rank == 0:
            free = os.statvfs("/dev/shm")
            room[0] = float(free.f_bavail * free.f_frsize > 2 * size)
        dist.broadcast(room, 0)
        if not room.item():
            self.refused = nbytes
            return False
        self.files += 1
        self.slot_bytes = slot_bytes
        path = f"/dev/shm/robodistill-{self.run}-{self.files}"
        if self.rank == 0:
            with open(path, "wb") as f:
                f.truncate(size)
        dist.barrier()
        raw = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        dist.barrier()
        if self.rank == 0:
            os.unlink(path)
        self.counters = raw[: self.world * self.HEADER].view(torch.int64).view(self.world, -1)[:, 0]
        self.slots = raw[self.world * self.HEADER :].view(2, self.world, self.slot_bytes)
        self.generation = 0
        return True

    def _wait(self) -> None:
        self.generation += 1
        self.counters[self.rank] = self.generation
        spins, deadline = 0, None
        while int(self.counters.min()) < self.generation:
            spins += 1
            if spins > 2000:  # another rank is busy elsewhere (rank 0 evaluating): stop burning a core
                time.sleep(1e-4)
                deadline = deadline or time.monotonic() + dist.default_pg_timeout.total_seconds()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rank {self.rank}: the other ranks did not reach this gradient average "
                                       f"within {dist.default_pg_timeout}")

    def reserve(self, nbytes: int) -> bool:
        """Room for tensors of `nbytes` (a collective where the buffer must grow); False where /dev/shm has none."""
        return nbytes <= self.slot_bytes or self._grow(nbytes)

    def _slots(self, flat: torch.Tensor) -> torch.Tensor:
        return self.slots[self.generation % 2, :, : flat.numel() * flat.element_size()].view(flat.dtype)

    def mean_(self, t: torch.Tensor) -> bool:
        """Average contiguous `t` in place; False (`t` untouched, on every rank) where there is no room."""
        flat = t.view(-1)
        if not self.reserve(flat.numel() * flat.element_size()):
            return False
        slots = self._slots(flat)
        torch.mul(flat, 1 / self.world, out=slots[self.rank])
        self._wait()
        torch.add(slots[0], slots[1], out=flat)
        for other in range(2, self.world):
            flat.add_(slots[other])
        return True

    def reduce_scatter_(self, flat: torch.Tensor, spans: list[tuple[int, int]]) -> None:
        """Average 1-d `flat` over the ranks in place, only within this rank's span (`spans[rank]` =
        (start, end)); the same bits as `mean_` there. Room must have been `reserve`d."""
        slots = self._slots(flat)
        torch.mul(flat, 1 / self.world, out=slots[self.rank])
        self._wait()
        a, b = spans[self.rank]
        torch.add(slots[0, a:b], slots[1, a:b], out=flat[a:b])
        for other in range(2, self.world):
            flat[a:b].add_(slots[other, a:b])

    def all_gather_(self, flat: torch.Tensor, spans: list[tuple[int, int]]) -> None:
        """Every rank's span of 1-d `flat` copied into the other ranks' `flat`. Room must have been `reserve`d."""
        slots = self._slots(flat)
        a, b = spans[self.rank]
        slots[self.rank, a:b].copy_(flat[a:b])
        self._wait()
        for other, (a, b) in enumerate(spans):
            if other != self.rank:
                flat[a:b].copy_(slots[other, a:b])


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    shared: SharedSlots | None = field(default=None, compare=False, repr=False)
    exchange: str = ""  # how gradients are averaged: "shared memory", "gloo" or "nccl"

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun describes in the environment (if any); the device for this rank."""
    world, chosen = int(os.environ.get("WORLD_SIZE", 1)), pick_device(device)
    if world == 1:
        return Ranks(), chosen
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = chosen.type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    shared = SharedSlots(rank, world) if SharedSlots.available(world, cuda) else None
    exchange = "shared memory" if shared else str(dist.get_backend())
    return Ranks(rank, world, shared, exchange), torch.device("cuda", local) if cuda else torch.device("cpu")


def mean_(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Replace `t` by its mean over the ranks, in place (a collective: every rank, the same size)."""
    if ranks.world == 1:
        return t
    if ranks.shared is not None and t.is_contiguous() and ranks.shared.mean_(t):
        return t
    dist.all_reduce(t)
    return t.div_(ranks.world)


def data_parallel(module: torch.nn.Module, ranks: Ranks, **ddp) -> torch.nn.Module:
    """`module` under DDP on more than one rank, its gradients averaged with `mean_`."""
    if ranks.world == 1:
        return module
    model = DDP(module, **ddp)
    if ranks.shared is not None:
        model.register_comm_hook(ranks, _mean_hook)
    return model


def _mean_hook(ranks, bucket):  # unannotated: DDP checks annotations as objects, and here they are strings
    done = torch.futures.Future()
    done.set_result(mean_(bucket.buffer(), ranks))
    return done


class Replicas:
    """One module trained on every rank, its replicas kept identical, for a loop that steps its own
    optimizer and EMA:

        loss = replicas.model(batch); replicas.zero_grad(); loss.backward(); replicas.reduce_gradients()
        optimizer.step(); ema.step(replicas.owned); replicas.gather_parameters()

    Where all ranks share a CPU host's memory (`Ranks.shared`), each rank owns a contiguous 1/N of the
    parameters (whole tensors): it averages the gradients of only those (a reduce-scatter through shared
    memory), steps the optimizer and EMA for only those, and then takes the others' updated parameters
    (an all-gather). DDP would run the optimizer and EMA over every parameter on every rank's one thread,
    work one process splits over its threads (the MLP teacher at batch 256 on 2 cores: 1.04x one process
    with shards, 0.85x with DDP; benchmarks/results/ddp.md). The parameters and gradients are views into two flat buffers, so a
    shard is a slice of each. Elsewhere (one rank; gloo or nccl between hosts or GPUs) the module runs
    under DDP, which averages the gradients in backward, and every rank owns every parameter.

    Checkpoints hold the whole optimizer and EMA state, as one process writes them (`full`, `local`),
    so a run resumes on any number of ranks."""

    def __init__(self, module: torch.nn.Module, ranks: Ranks, **ddp):
        self.module, self.ranks = module, ranks
        self.params = list(module.parameters())
        offsets = [0] + torch.tensor([p.numel() for p in self.params]).cumsum(0).tolist()  # each tensor's start in the flat buffers
        total = offsets[-1]
        # rank r owns params[bounds[r]:bounds[r + 1]]: the tensor boundary nearest to r / N of all elements
        self.bounds = [min(range(len(offsets)), key=lambda i: abs(offsets[i] - total * r / ranks.world)) for r in range(ranks.world)]
        self.bounds.append(len(self.params))
        self.sharded = (ranks.world > 1 and ranks.shared is not None and all(a < b for a, b in zip(self.bounds, self.bounds[1:]))
                        and ranks.shared.reserve(total * self.params[0].element_size()))
        if not self.sharded:
            self.model, self.owned = data_parallel(module, ranks, **ddp), self.params
            return
        self.model = module
        first = self.params[0]
        self.flat = torch.empty(total, dtype=first.dtype, device=first.device)
        self.grads = torch.zeros_like(self.flat)
        for p, a, b in zip(self.params, offsets, offsets[1:]):
            self.flat[a:b].copy_(p.detach().flatten())
            p.data = self.flat[a:b].view_as(p)
            p.grad = self.grads[a:b].view_as(p)  # backward accumulates into it in place
        self.spans = [(offsets[a], offsets[b]) for a, b in zip(self.bounds, self.bounds[1:])]
        self.owned = self.params[self.bounds[ranks.rank] : self.bounds[ranks.rank + 1]]

    def zero_grad(self) -> None:
        if self.sharded:
            self.grads.zero_()  # every gradient: the other ranks' shards are averaged from it too
        else:
            for p in self.params:
                p.grad = None

    def reduce_gradients(self) -> None:
        """After backward: this rank's shard of the gradients averaged over the ranks (DDP did it in backward)."""
        if self.sharded:
            self.ranks.shared.reduce_scatter_(self.grads, self.spans)

    def gather_parameters(self) -> None:
        """After the optimizer step: the other ranks' updated shards."""
        if self.sharded:
            self.ranks.shared.all_gather_(self.flat, self.spans)

    def local(self, state: dict) -> dict:
        """A checkpoint (`runs.training_state`, written by one process or by `full`'s rank 0) with its
        optimizer and EMA state cut to this rank's shard."""
        if not self.sharded:
            return state
        a, b = self.bounds[self.ranks.rank], self.bounds[self.ranks.rank + 1]
        optimizer, ema = state["optimizer"], state["ema_state"]
        return {**state, "optimizer": {"state": {i - a: s for i, s in optimizer["state"].items() if a <= i < b},
                                       "param_groups": [{**g, "params": list(range(b - a))} for g in optimizer["param_groups"]]},
                "ema_state": {**ema, "shadow_params": ema["shadow_params"][a:b]}}

    def full(self, optimizer: torch.optim.Optimizer, ema):
        """The optimizer and EMA over every parameter, as one process holds them, on rank 0 (None, None
        on the others): what checkpoints and evaluation take. A collective: every rank calls it."""
        if not self.sharded:
            return optimizer, ema
        shards: list | None = [None] * self.ranks.world if self.ranks.main else None
        dist.gather_object((optimizer.state_dict(), ema.state_dict()), shards, dst=0)
        if not self.ranks.main:
            return None, None
        whole = {"state": {}, "param_groups": [{**shards[0][0]["param_groups"][0], "params": list(range(len(self.params)))}]}
        shadows = []
        for start, (opt_state, ema_state) in zip(self.bounds, shards):
            whole["state"].update({start + i: s for i, s in opt_state["state"].items()})
            shadows += ema_state["shadow_params"]
        full_optimizer, full_ema = type(optimizer)(self.params), type(ema)(self.params)
        full_optimizer.load_state_dict(whole)
        full_ema.load_state_dict({**shards[0][1], "shadow_params": shadows})
        return full_optimizer, full_ema


def describe(result: dict) -> str:
    """The line a multi-rank run prints at the end (from its result's `ranks`, `gradient_exchange`,
    `replicas_identical` and, from a `Replicas` loop, `sharded`)."""
    how = ("each updating its shard of the parameters, gradients and parameters exchanged over shared memory"
           if result.get("sharded") else f"DDP, gradients averaged over {result['gradient_exchange']}")
    return f"{result['ranks']} ranks ({how}); replicas identical at the end: {result['replicas_identical']}"


def any_rank(flag: bool, ranks: Ranks) -> bool:
    """True on every rank if it is true on one (e.g. rank 0 has used up the time budget)."""
    if ranks.world == 1:
        return flag
    # nccl (the CUDA ranks' backend) serves CUDA tensors only: a CPU one is refused ("No backend type associated with
    # device type cpu"), at the first loss check (iteration 50) of every multi-GPU run
    t = torch.tensor([float(flag)], device="cuda" if ranks.exchange == "nccl" else None)  # "cuda": the rank's own, set by setup()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def diverged(what: str, when: str, lr: float, flag: str = "lr", also: str = "") -> UserError:
    """The one line every training command ends in when its training stops being finite: `what` (the loss, the
    weights, a chain's outputs) `when` ("by iteration 50"), at the learning rate `flag`=`lr`, and the fix (`also`: another)."""
    return UserError(f"{what} stopped being finite {when}: training diverged at {flag}={lr:g}: lower {flag}={also} and start again")


def finite_loss(loss: torch.Tensor, step: int, lr: float, ranks: Ranks = Ranks()) -> float:
    """`loss` as a float; a run whose loss is no longer finite (on any rank) ends in one line. Trained on, it only
    saved NaN weights, which an evaluation then met as ManiSkill's "Action cannot be NaN" traceback."""
    value = loss.item()
    if any_rank(not math.isfinite(value), ranks):
        raise diverged("the training loss", f"by iteration {step}", lr, also=" (or raise warmup=)")
    return value


def finite_weights(params, at: str, lr: float, ranks: Ranks = Ranks(), log_std: torch.Tensor | None = None) -> None:
    """An RL update that left weights NaN or inf (on any rank) ends the run in one line; the next rollout ended in
    torch's "Expected parameter scale ... found invalid values" traceback from the action distribution. So did a
    finite `log_std` (the action distribution's) whose std is 0 or inf in float32 (below about -104: lr=1e30)."""
    finite = torch.stack([torch.isfinite(p).all() for p in params]).all()
    if log_std is not None:
        std = log_std.exp()
        finite = finite & (std > 0).all() & torch.isfinite(std).all()
    if any_rank(not bool(finite), ranks):
        raise diverged("the policy's weights", f"by {at}", lr)


def average_gradients(module: torch.nn.Module, ranks: Ranks, *scalars: float) -> list[float]:
    """Replace every gradient of `module` by its mean over the ranks, in place, and return the
    ranks' mean of `scalars`: all in one all-reduce (for loops that step their own optimizer)."""
    if ranks.world == 1:
        return list(scalars)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    extra = torch.tensor(scalars, dtype=grads[0].dtype, device=grads[0].device)
    flat = mean_(torch.cat([g.flatten() for g in grads] + [extra]), ranks)
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
