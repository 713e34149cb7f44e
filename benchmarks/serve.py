"""The policy server under load: N concurrent clients x M requests each, on loopback.

Side by side, in one run: the bundle called in-process (the floor: no wire, one call at a time), and
`robodistill serve` in its own process with request batching off (max_batch=1) and on (the default,
32), each driven by 1, 4 and 16 `openpi_client.WebsocketClientPolicy` clients in threads of this
process. Prints requests/s and client-side round-trip p50/p99 per row, and the requests that got
no actions back (must be 0).

    .venv/bin/python benchmarks/serve.py --bundle runs/export/<run>/bundle [--requests 200] [--clients 1 4 16]

Pin it (taskset -c 0,1) and run nothing else: it times wall clock.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from robodistill.policies.bundle import Bundle
from robodistill.summary import sampler_words

from common import absolute, at_least, guarded


def observation(bundle: Bundle, rng: np.random.Generator) -> dict[str, np.ndarray]:
    obs = {}
    for key, spec in bundle.observation.items():
        if spec["dtype"] == "uint8":
            obs[key] = rng.integers(0, 256, spec["shape"], dtype=np.uint8)
        else:
            obs[key] = rng.standard_normal(spec["shape"]).astype(spec["dtype"])
    return obs


def start_server(bundle: Path, max_batch: int, run_dir: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "robodistill.cli", "serve", f"bundle={bundle}", "port=0",
                             f"max_batch={max_batch}", f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        found = re.search(r"on ws://127\.0\.0\.1:(\d+)", line)
        if found:
            return proc, int(found.group(1))
    raise RuntimeError(f"the server did not start: {proc.stdout.read()}")


def drive(port: int, clients: int, requests: int, obs: dict) -> dict:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    dropped = [0] * clients
    conns = [WebsocketClientPolicy("127.0.0.1", port) for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def run(i: int) -> None:
        barrier.wait()
        for _ in range(requests):
            start = time.perf_counter()
            try:
                ok = conns[i].infer(obs)["actions"].ndim == 2
            except Exception:
                ok = False
            latencies[i].append(time.perf_counter() - start)
            dropped[i] += not ok

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.concatenate(latencies) * 1e3
    return {"requests": clients * requests, "per_s": clients * requests / wall, "p50": np.percentile(ms, 50),
            "p99": np.percentile(ms, 99), "dropped": sum(dropped)}


def in_process(bundle: Bundle, requests: int, obs: dict) -> dict:
    rng = np.random.default_rng(0)
    batched = {k: v[None] for k, v in obs.items()}
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        bundle.infer(batched, bundle.noise(1, rng))
        times.append(time.perf_counter() - start)
    ms = np.asarray(times) * 1e3
    return {"requests": requests, "per_s": requests / sum(times), "p50": np.percentile(ms, 50),
            "p99": np.percentile(ms, 99), "dropped": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=absolute, required=True, help="a bundle directory (robodistill export; make demo writes one)")
    ap.add_argument("--requests", type=int, default=200, help="requests per client")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    a = ap.parse_args()
    at_least("--requests", a.requests)
    at_least("--clients", min(a.clients))
    bundle = Bundle.load(a.bundle)
    obs = observation(bundle, np.random.default_rng(0))
    rows = [("in-process Bundle.infer", 1, in_process(bundle, a.requests, obs))]
    # The servers' run dirs hold nothing to keep: one of this run's own, so concurrent runs do not share one.
    with tempfile.TemporaryDirectory(prefix="robodistill-bench-serve-") as tmp:
        for max_batch in (1, 32):
            proc, port = start_server(a.bundle, max_batch, Path(tmp) / f"max_batch{max_batch}")
            try:
                drive(port, 1, 20, obs)  # warm-up
                for n in a.clients:
                    rows.append((f"serve max_batch={max_batch}", n, drive(port, n, a.requests, obs)))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    m = bundle.metadata
    print(f"{m['env']['task']} bundle ({m['graph']['format']}, {sampler_words(m['policy']['sampler'], m['policy']['steps'])}), loopback\n")
    print("| path | clients | requests | requests/s | p50 ms | p99 ms | dropped |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, r in rows:
        print(f"| {name} | {n} | {r['requests']} | {r['per_s']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['dropped']} |")
    dropped = sum(r["dropped"] for _, _, r in rows)
    print(f"\n{'no request dropped' if dropped == 0 else f'{dropped} requests DROPPED'}")


if __name__ == "__main__":
    guarded(main)
