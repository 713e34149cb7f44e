"""Deploy: export bundles, the openpi-protocol server, the fixed-rate controller."""

import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from stable_baselines3 import PPO
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from robodistill import checkpoints, wire
from robodistill.deploy.controller import ChunkAgent, ControllerConfig
from robodistill.deploy.export import ExportConfig, export
from robodistill.envs import EnvConfig, make_env
from robodistill.errors import CutShort, UserError
from robodistill.deploy.server import PolicyServer
from robodistill.policies.bundle import Bundle, BundleError, metadata_checksum
from robodistill.policies.diffusion import DiffusionConfig, DiffusionPolicy
from robodistill.policies.diffusion.consistency import ConsistencyHead
from robodistill.wire import connect, served_env
from tests.conftest import ROBODISTILL, SlowPolicy, disk_full_past

ENV = EnvConfig(task="PushCube-v1", max_episode_steps=30)


@contextlib.contextmanager
def serving(handler):
    """A websocket server that is not robodistill's, running `handler(ws)` for each connection: its URL."""
    from websockets.sync.server import serve

    with serve(handler, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"ws://127.0.0.1:{server.socket.getsockname()[1]}"
        finally:
            server.shutdown()


def opens_with(metadata):
    """A handler for `serving`: a server that sends `metadata` on connect and answers nothing more."""
    from openpi_client import msgpack_numpy

    def opens(ws):
        ws.send(msgpack_numpy.packb(metadata))
        try:
            ws.recv()
        except ConnectionClosed:
            pass

    return opens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small diffusion checkpoint with a consistency head: untrained weights, real shapes for PushCube."""
    torch.manual_seed(0)
    with make_env(ENV) as env:
        state_dim, action_dim = env.single_observation_space["state"].shape[-1], env.single_action_space.shape[-1]
    cfg = DiffusionConfig(pred_horizon=8, act_horizon=4, mlp_hidden=[64, 64])
    policy = DiffusionPolicy(cfg, state_dim, action_dim, -torch.ones(action_dim), torch.ones(action_dim), gripper_dims=[action_dim - 1])
    policy.normalizers["state"].scale.uniform_(0.5, 2.0)  # not the identity, so normalisation is exercised
    head = ConsistencyHead.from_denoiser(policy.denoiser)
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    checkpoints.save(path, {"kind": "diffusion", "policy": policy.spec(), "env": asdict(ENV), "ema": policy.state_dict(),
                            "consistency": {"weights": head.state_dict()}})
    return path


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory) -> Path:
    out, _ = export(ExportConfig(ckpt=str(checkpoint), sampler="consistency", steps=2), tmp_path_factory.mktemp("b") / "bundle")
    return out


def _in_process_policy(checkpoint, sampler, steps) -> DiffusionPolicy:
    from robodistill.policies.diffusion.policy import from_checkpoint

    policy = from_checkpoint(checkpoints.load(checkpoint))
    policy.set_sampler(sampler, steps)
    return policy


@pytest.mark.parametrize("fmt,sampler,steps", [("onnx", "consistency", 2), ("torchscript", "ddim", 3)])
def test_bundle_computes_what_the_policy_computes(checkpoint, tmp_path, fmt, sampler, steps):
    killed = tmp_path / ".b.999999999-x2k1"  # the temp folder of an export killed with SIGKILL (no such pid): stayed for good
    killed.mkdir()
    (killed / "policy.onnx").write_bytes(b"partial")
    out, meta = export(ExportConfig(ckpt=str(checkpoint), sampler=sampler, steps=steps, format=fmt), tmp_path / "b")
    assert not killed.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert meta["parity"]["max_abs_diff"] <= 1e-4 and meta["source"]["sha256"] and meta["env"]["control_freq"] == 20
    assert meta["action"]["chunk_length"] == 4 and meta["observation"]["state"]["dtype"] == "float32"
    loaded = Bundle.load(out)
    policy = _in_process_policy(checkpoint, sampler, steps)
    obs = {"state": torch.randn(5, 2, meta["observation"]["state"]["shape"][1])}
    # The sampler's draws, in the order the in-process sampler makes them, are the bundle's noise input.
    gen = torch.Generator().manual_seed(7)
    noise = torch.stack([torch.randn(5, 8, 4, generator=gen) for _ in range(meta["noise"]["shape"][0])], dim=1)
    policy.generator = torch.Generator().manual_seed(7)
    expected = policy.predict_chunk(obs).numpy()
    got = loaded.infer({"state": obs["state"].numpy()}, noise.numpy())
    assert got.shape == (5, 4, 4) and np.abs(got - expected).max() < 1e-5


def test_a_torchscript_bundle_answers_its_first_request_within_a_20_hz_deadline(checkpoint, tmp_path):
    out, meta = export(ExportConfig(ckpt=str(checkpoint), sampler="consistency", steps=2, format="torchscript"), tmp_path / "b")
    # a fresh process, as `serve` is: this one's export already ran TorchScript
    proc = subprocess.Popen([*ROBODISTILL, "serve", f"bundle={out}", "port=0", f"hydra.run.dir={tmp_path / 'serve'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = next(int(m.group(1)) for line in proc.stdout if (m := re.search(r"on ws://127\.0\.0\.1:(\d+)", line)))
        client = WebsocketClientPolicy("127.0.0.1", port)
        obs = {"state": np.zeros(meta["observation"]["state"]["shape"], np.float32)}
        # its graph's first two calls took 40-60 and 10-20 ms (TorchScript optimising it) when a client made them
        assert client.infer(obs)["server_timing"]["infer_ms"] < 25
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_threads_bound_a_torchscript_graph_and_other_loads_leave_torch_s_as_they_are(checkpoint, tmp_path):
    out, _ = export(ExportConfig(ckpt=str(checkpoint), sampler="consistency", steps=1, format="torchscript"), tmp_path / "b")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        Bundle.load(out)  # a teacher's or an evaluation's bundle: the process's threads are the run's
        assert torch.get_num_threads() == 2
        Bundle.load(out, threads=1)  # serve threads=1: was ignored, the graph ran on every core torch found
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_export_and_bundle_refuse_what_they_cannot_use(checkpoint, bundle, tmp_path, cli_here):
    bad = cli_here("export", f"ckpt={checkpoint}", "format=tflite")
    assert bad.returncode == 2 and "format='tflite' is not one of onnx, torchscript" in bad.stderr
    with pytest.raises(UserError, match="keeps a chunk per stream"):
        export(ExportConfig(ckpt=str(checkpoint), sampler="rti"), tmp_path / "x")
    with pytest.raises(UserError, match="exists and is not empty"):
        export(ExportConfig(ckpt=str(checkpoint)), bundle)
    with pytest.raises(UserError, match="parity_batch=0 must be >= 1"):
        export(ExportConfig(ckpt=str(checkpoint), parity_batch=0), tmp_path / "x")
    with pytest.raises(UserError, match="task=PickCube-v1: .* drives PushCube-v1"):
        export(ExportConfig(ckpt=str(checkpoint), task="PickCube-v1"), tmp_path / "x")
    payload = checkpoints.load(checkpoint)
    del payload["consistency"]
    checkpoints.save(tmp_path / "teacher.pt", payload)
    with pytest.raises(UserError, match="no consistency head"):
        export(ExportConfig(ckpt=str(tmp_path / "teacher.pt")), tmp_path / "y")

    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(bundle), str(copy)], check=True)
    graph = copy / "policy.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 1
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="policy.onnx does not match the sha256"):
        Bundle.load(copy)
    graph.unlink()
    with pytest.raises(BundleError, match="missing policy.onnx"):
        Bundle.load(copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["action"]["high"] = [9.0] * 4
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="modified after export"):
        Bundle.load(copy)
    # Edits that recompute the checksum may still not take the graph out of the hashed files or out of the bundle.
    for edit_, message in ((lambda m: m.update(files={}), "a hashed graph file"),
                           (lambda m: m["graph"].update(file="/tmp/other.onnx"), "a hashed graph file"),
                           (lambda m: m.pop("noise"), "lacks noise")):
        meta = json.loads((bundle / "metadata.json").read_text())
        edit_(meta)
        meta["checksum"] = metadata_checksum(meta)
        (copy / "metadata.json").write_text(json.dumps(meta))
        with pytest.raises(BundleError, match=message):
            Bundle.load(copy)
    # overwrite=true replaces an earlier export, never another directory (here: the checkpoint's own run)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoints.save(run / "checkpoints" / "last.pt", checkpoints.load(checkpoint))
    with pytest.raises(UserError, match="overwrite=true only replaces an earlier export"):
        export(ExportConfig(ckpt=str(run / "checkpoints" / "last.pt"), overwrite=True), run)
    assert (run / "checkpoints" / "last.pt").is_file()
    # a run's directory for the file in it: named, not "give the path of a checkpoint"
    with pytest.raises(UserError, match=re.escape(f"ckpt={run} is a run directory: give the checkpoint in it, ckpt={run / 'checkpoints' / 'last.pt'}")):
        export(ExportConfig(ckpt=str(run)), tmp_path / "z")
    with pytest.raises(UserError, match=re.escape(f"ckpt={bundle.parent} is an export run: its bundle, {bundle}, is exported already")):
        export(ExportConfig(ckpt=str(bundle.parent)), tmp_path / "z")
    with pytest.raises(UserError, match="is a file"):
        export(ExportConfig(ckpt=str(checkpoint)), run / "checkpoints" / "last.pt")
    with pytest.raises(UserError, match=f"out={run / 'checkpoints' / 'last.pt' / 'bundle'} cannot be written"):  # a file on its path
        export(ExportConfig(ckpt=str(checkpoint)), run / "checkpoints" / "last.pt" / "bundle")
    loaded_bundle = Bundle.load(bundle)
    with pytest.raises(UserError, match="max_message_mb=0 must be > 0"):
        PolicyServer(loaded_bundle, max_message_mb=0)
    first = PolicyServer(loaded_bundle, port=0).start()
    try:
        start = time.perf_counter()
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            PolicyServer(loaded_bundle, port=first.port).start()
        assert time.perf_counter() - start < 5  # told at once, not after the 30 s start-up wait
    finally:
        first.stop()


@pytest.fixture(scope="module")
def server(bundle):
    """`robodistill serve` in its own process, on a free port, with an API key."""
    proc = subprocess.Popen([*ROBODISTILL, "serve", f"bundle={bundle}", "port=0", "api_key=sesame", "max_message_mb=1",
                             f"hydra.run.dir={bundle.parent / 'serve'}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        found = re.search(r"on ws://127\.0\.0\.1:(\d+)", line)
        if found:
            break
    assert found, "".join(lines)
    yield int(found.group(1))
    proc.terminate()
    assert proc.wait(timeout=30) == 0
    assert "requests" in proc.stdout.read()


def test_server_speaks_openpi_protocol_and_survives_bad_input(server, bundle):
    with urllib.request.urlopen(f"http://127.0.0.1:{server}/healthz") as r:
        assert r.status == 200
    with pytest.raises(InvalidStatus, match="401"):
        WebsocketClientPolicy("127.0.0.1", server, api_key="wrong")
    client = WebsocketClientPolicy("127.0.0.1", server, api_key="sesame")
    meta = client.get_server_metadata()
    assert meta["checksum"] == json.loads((bundle / "metadata.json").read_text())["checksum"]
    obs = {"state": np.zeros(meta["observation"]["state"]["shape"], np.float32)}
    reply = client.infer(obs)
    assert reply["actions"].shape == (4, 4) and reply["server_timing"]["infer_ms"] > 0

    bad = {
        "missing key": ({"image": obs["state"]}, "missing key(s) ['state']"),
        "wrong shape": ({"state": obs["state"][0]}, "expected (2, "),
        "wrong dtype": ({"state": obs["state"].astype(np.float64)}, "expected float32"),
        "NaN": ({"state": np.full_like(obs["state"], np.nan)}, "NaN or inf"),
        "overflowing": ({"state": np.full_like(obs["state"], 3e38)}, "actions for this observation are not finite"),  # were NaN
        "not a dict": ([1, 2], "must be a dict"),
    }
    for case, (payload, message) in bad.items():
        with pytest.raises(RuntimeError, match=re.escape(message)):
            client.infer(payload)
    client._ws.send(b"\xc1 not msgpack")
    assert "malformed frame" in client._ws.recv()
    # openpi's codec laid an object dtype over the frame's bytes: its elements were pointers the client chose
    client._ws.send(msgpack.packb({"state": {b"__ndarray__": True, b"data": b"\x01" * 8, b"dtype": "|O", b"shape": (1,)}}))
    assert "arrays of Python objects (dtype object) cannot be sent" in client._ws.recv()
    assert np.array_equal(client.infer(obs)["actions"].shape, (4, 4))  # the connection still serves

    big = WebsocketClientPolicy("127.0.0.1", server, api_key="sesame")
    with pytest.raises(ConnectionClosedError, match="message too big"):
        big.infer({"state": np.zeros((600, 1000), np.float32)})

    # Several clients at once; each connection's noise starts from the server seed, so identical
    # requests get identical answers whoever else is being served.
    answers, errors = {}, []

    def one_client(i: int) -> None:
        try:
            c = WebsocketClientPolicy("127.0.0.1", server, api_key="sesame")
            answers[i] = [c.infer(obs)["actions"] for _ in range(20)]
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(answers) == 4
    for i in range(1, 4):
        np.testing.assert_allclose(np.stack(answers[i]), np.stack(answers[0]), atol=1e-5)


def test_a_served_rgb_bundle_says_how_to_send_its_images(pickcube_rgb_teacher, tmp_path):
    out, meta = export(ExportConfig(ckpt=str(pickcube_rgb_teacher)), tmp_path / "bundle")
    assert meta["observation"]["rgb"] == {"shape": [2, 48, 48, 3], "dtype": "uint8"} and meta["env"]["image_size"] == 48
    server = PolicyServer(Bundle.load(out), port=0).start()
    try:
        client = WebsocketClientPolicy("127.0.0.1", server.port)
        rng = np.random.default_rng(0)
        obs = {"rgb": rng.integers(0, 256, (2, 48, 48, 3), dtype=np.uint8), "state": np.zeros(meta["observation"]["state"]["shape"], np.float32)}
        assert client.infer(obs)["actions"].shape == (meta["action"]["chunk_length"], meta["action"]["dim"])
        bad = {  # the advice for a float image was np.asarray(x, dtype=np.uint8): a [0, 1] image became a black one
            "float in [0, 1]": ({**obs, "rgb": obs["rgb"] / np.float32(255)}, "send an image in [0, 1] as (x * 255).round().astype(np.uint8)"),
            "channel-first": ({**obs, "rgb": np.moveaxis(obs["rgb"], -1, -3)}, "images go channel-last, (H, W, C): send np.moveaxis(x, -3, -1)"),
            "another size": ({**obs, "rgb": np.zeros((2, 64, 64, 3), np.uint8)}, "expected (2, 48, 48, 3): the last 2 observations"),
            "no image": ({"state": obs["state"]}, "missing key(s) ['rgb']"),
            "integers": ({**obs, "rgb": obs["rgb"].astype(np.int64)}, "expected uint8 (send np.asarray(x, dtype=np.uint8))"),
        }
        for case, (payload, message) in bad.items():
            with pytest.raises(RuntimeError, match=re.escape(message)):
                client.infer(payload)
    finally:
        server.stop()


def test_closed_loop_through_the_server_equals_in_process_evaluation(server, bundle, cli, cli_here, tmp_path):
    env = {"ROBODISTILL_API_KEY": "sesame"}
    # seed=0 resets the episodes with seeds 0, 1 and is the server's noise seed (the fixture's default),
    # which `eval policy=<bundle> seed=0` also uses for its noise.
    loop = cli("control", f"server=ws://127.0.0.1:{server}", "episodes=2", "seed=0", "hz=0", "max_episode_steps=30", "name=c", env=env)
    assert loop.returncode == 0, loop.stderr[-3000:]
    assert "deadline misses  0 of 60 steps" in loop.stdout and "success_once" in loop.stdout
    local = cli("eval", f"policy={bundle}", "episodes=2", "seed=0", "env.max_episode_steps=30", "name=e")
    assert local.returncode == 0, local.stderr[-3000:]
    (c,) = (tmp_path / "runs" / "control").glob("*-c")
    (e,) = (tmp_path / "runs" / "eval").glob("*-e")
    through, here = json.loads((c / "control.json").read_text()), json.loads((e / "eval.json").read_text())
    # Same seeds, same noise stream: the same episodes, step for step.
    assert [x["seed"] for x in through["episodes"]] == [x["seed"] for x in here["episodes"]] == [0, 1]
    for a, b in zip(through["episodes"], here["episodes"]):
        assert a["success_once"] == b["success_once"] and a["return"] == pytest.approx(b["return"], abs=1e-3)
    lo, hi = here["summary"]["success_once"]["ci95"]
    assert lo <= through["summary"]["success_once"]["rate"] <= hi
    assert through["timing"]["requests"] == 2 * 8  # 30 steps, 4 actions per chunk
    assert (c / "telemetry.csv").read_text().count("\n") == 61

    table = cli_here("summary", "--name", "c")
    assert table.returncode == 0 and "through the server unpaced (hz=0)" in table.stdout and "0/60 deadline misses" in table.stdout

    wrong = cli("control", f"server=ws://127.0.0.1:{server}", "episodes=1", env={"ROBODISTILL_API_KEY": "nope"})
    assert wrong.returncode == 2 and "refused the connection (HTTP 401)" in wrong.stderr
    other = cli("control", f"server=ws://127.0.0.1:{server}", "task=PickCube-v1", "episodes=1", env=env)
    assert other.returncode == 2 and "task=PickCube-v1, but the policy drives PushCube-v1" in other.stderr
    nobody = cli_here("control", "server=ws://127.0.0.1:9", "episodes=1")
    assert nobody.returncode == 2 and "no policy server at ws://127.0.0.1:9" in nobody.stderr


def test_serve_and_control_given_a_run_directory_name_the_bundle_or_the_export_to_run(bundle, checkpoint, cli_here, tmp_path):
    for command in ("serve", "control"):  # an export's run directory: its bundle is in bundle/
        r = cli_here(command, f"bundle={bundle.parent}")
        assert r.returncode == 2 and f"'{bundle.parent}' is an export run, not a bundle: give bundle={bundle}" in r.stderr, r.stderr[-2000:]
    sweep = tmp_path / "sweep"  # an export sweep's directory (-m): its jobs' bundles, not "make one with robodistill export"
    shutil.copytree(bundle, sweep / "0" / "bundle")
    r = cli_here("serve", f"bundle={sweep}")
    assert r.returncode == 2 and f"give bundle={sweep / '0' / 'bundle'}" in r.stderr, r.stderr[-2000:]
    run = tmp_path / "teacher"  # a training run: its checkpoint exports to a bundle
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(checkpoint.read_bytes())
    with pytest.raises(BundleError, match=re.escape(f"make one with `robodistill export ckpt={run / 'checkpoints' / 'last.pt'}`")):
        Bundle.load(run)


def test_serve_threads_zero_is_one_line(bundle, cli):
    r = cli("serve", f"bundle={bundle}", "port=0", "threads=0", timeout=60)  # onnxruntime took 0 as all cores, and served
    assert r.returncode == 2 and "error: threads=0 must be >= 1: the graph runtime's inference threads" in r.stderr, r.stderr[-2000:]


def test_control_and_serve_refuse_an_episode_limit_or_seed_below_range(bundle, cli_here):
    for limit in ("0", "-5"):  # 0 ran the bundle's limit; -5 was refused as env.max_episode_steps, not control's flag
        r = cli_here("control", f"bundle={bundle}", "episodes=1", "hz=0", f"max_episode_steps={limit}")
        assert r.returncode == 2 and f"error: max_episode_steps={limit} must be >= 1 (or left out" in r.stderr, r.stderr[-2000:]
    for command, message in (("control", "seed must be >= 0 (episode k is reset with seed + k), got -1"),
                             ("serve", "seed=-1 must be >= 0: each connection's noise generator starts from it")):
        r = cli_here(command, f"bundle={bundle}", "seed=-1")  # closed every connection with 1011 (internal error)
        assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]


def test_control_at_a_rate_the_robot_cannot_step_says_the_rate_it_kept(bundle, cli_here):
    r = cli_here("control", f"bundle={bundle}", "hz=2000", "episodes=1", "max_episode_steps=10")  # a sim step takes ms
    assert r.returncode == 0, r.stderr[-2000:]
    kept = re.search(r"it kept (\d+) Hz, not 2000: the robot's step takes longer than a period; lower hz=", r.stdout)
    assert kept and int(kept.group(1)) < 2000, r.stdout[-2000:]
    table = cli_here("summary")  # it said 'through the server at 2000 Hz'
    assert re.search(rf"through the server at 2000 Hz \(it kept {kept.group(1)} Hz\)", table.stdout), table.stdout


def test_a_port_that_is_not_a_policy_server_is_one_line(cli_here):
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    url = f"ws://127.0.0.1:{plain.server_port}"
    try:
        for args in (("control", f"server={url}", "episodes=1"), ("rpd", f"teacher={url}", "total_steps=400")):
            r = cli_here(*args)
            assert r.returncode == 2 and f"error: {url} is not a websocket policy server" in r.stderr, r.stderr[-2000:]
    finally:
        plain.shutdown()


def test_a_server_url_with_a_port_out_of_range_is_one_line(cli_here):
    for url, reason in (("ws://127.0.0.1:99999", "Port out of range 0-65535"), ("ws://127.0.0.1:8OOO", "Port could not be cast")):
        for args in (("control", f"server={url}", "episodes=1"), ("rpd", f"teacher={url}", "total_steps=400")):
            r = cli_here(*args)  # was urllib's ValueError, in a traceback
            assert r.returncode == 2 and f"error: '{url}' is not a websocket URL ({reason}" in r.stderr, r.stderr[-2000:]
    with pytest.raises(UserError, match=r"'ws://127.0.0.1:0' is not a websocket URL \(port 0 is no server's: `robodistill serve port=0` prints"):
        connect("ws://127.0.0.1:0")  # was a connection to port 80


@pytest.mark.timeout(60)  # a hang fails the test
def test_a_websocket_server_that_does_not_open_with_metadata_is_one_line(cli_here, monkeypatch):
    monkeypatch.setattr(wire, "METADATA_TIMEOUT_S", 0.5, raising=False)  # openpi's client waited for it forever
    opens = {  # what each server does on connect; the line control ends with
        "nothing": (lambda ws: ws.recv(), "sent no metadata within 0.5 s of connecting: it is not a policy server"),
        "text": (lambda ws: ws.send("Traceback (most recent call last): ..."),  # was msgpack's TypeError traceback
                 "is not a policy server: it opened with text ('Traceback (most recent call last): ...'), not metadata"),
        "bytes": (lambda ws: ws.send(b"\xc1\xc1\xc1"), "is not a policy server: it opened with 3 bytes that are not msgpack"),
        "list": (lambda ws: ws.send(msgpack.packb([1, 2])), "is not a policy server: it opened with a msgpack list"),
        "close": (lambda ws: ws.close(1013, "busy"), "closed the connection before sending its metadata (received 1013"),
    }
    for name, (handler, message) in opens.items():
        def quietly(ws, handler=handler):
            try:
                handler(ws)
                ws.recv()  # until the client goes
            except ConnectionClosed:
                pass

        with serving(quietly) as url:
            said = [cli_here("control", f"server={url}", "episodes=1"), cli_here("rpd", f"teacher={url}", "total_steps=400")]
        for r in said:  # rpd's teacher= ended a list in AttributeError's traceback
            assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith(f"error: {url} "), (name, r.stderr[-2000:])
            assert message in r.stderr, (name, r.stderr[-2000:])


def test_control_given_metadata_it_cannot_read_says_whose_it_is(bundle, cli_here):
    meta = Bundle.load(bundle).metadata
    newer = {**meta, "format": "robodistill-bundle-v2", "env": {"id": meta["env"]["task"]}}  # was KeyError's traceback
    cases = ((newer, "sent the metadata of a robodistill-bundle-v2 bundle (robodistill "),
             ({"policy_name": "pi0"}, "sent no robodistill bundle metadata, which control takes"))  # openpi's
    for metadata, message in cases:
        with serving(opens_with(metadata)) as url:
            r = cli_here("control", f"server={url}", "episodes=1")
        assert r.returncode == 2 and message in r.stderr.splitlines()[-1], r.stderr[-2000:]


@pytest.mark.parametrize("on_late", ["hold", "stop"])
def test_late_inference_holds_or_stops_and_stale_actions_are_skipped(bundle, on_late):
    loaded = Bundle.load(bundle)
    agent = ChunkAgent(SlowPolicy(loaded, delay=0.12), loaded.metadata, ControllerConfig(hz=20, deadline_ms=20, on_late=on_late))
    agent.reset()
    frame = {"state": np.zeros(loaded.metadata["observation"]["state"]["shape"][1], np.float32)}
    actions = []
    for _ in range(12):
        actions.append(agent.get_action(frame)["actions"])
        time.sleep(0.05)  # the rest of a 20 Hz period
    late = [r["late"] for r in agent.records]
    assert late[:2] == [True, True]  # 120 ms of inference: the first steps have nothing in time
    assert not all(late)
    assert agent.requests[0]["skipped"] >= 2  # the chunk came back steps after its observation
    if on_late == "stop":  # delta control: zero arm motion, the gripper as it was
        np.testing.assert_array_equal(actions[0], np.zeros(4))
    low, high = np.asarray(loaded.metadata["action"]["low"]), np.asarray(loaded.metadata["action"]["high"])
    assert all(((a >= low) & (a <= high)).all() for a in actions)
    # Under position control a zero action is a pose far away, not a stop: an episode's first step waits for its chunk.
    position = {**loaded.metadata, "env": {**loaded.metadata["env"], "control_mode": "pd_joint_pos"}}
    agent = ChunkAgent(SlowPolicy(loaded, delay=0.12), position, ControllerConfig(hz=20, deadline_ms=20, on_late=on_late))
    agent.reset()
    first = agent.get_action(frame)["actions"]
    assert not agent.records[0]["late"] and agent.records[0]["wait_ms"] >= 100
    np.testing.assert_array_equal(first, agent.chunk[0])
    with pytest.raises(UserError, match="replan_below=4"):
        ControllerConfig(replan_below=4).check(4)


def test_a_server_that_stops_answering_stops_the_robot_and_ends_the_run(bundle):
    loaded = Bundle.load(bundle)
    hung = SlowPolicy(loaded, delay=0.0)
    agent = ChunkAgent(hung, loaded.metadata, ControllerConfig(hz=20, deadline_ms=20, on_late="hold", timeout_ms=300))
    agent.reset()
    frame = {"state": np.zeros(loaded.metadata["observation"]["state"]["shape"][1], np.float32)}
    actions = [agent.get_action(frame)["actions"]]
    hung.delay = 60  # the first chunk came back; the next request never will
    chunk = agent.chunk.copy()
    with pytest.raises(UserError, match="no answer from the policy server for 300 ms"):
        for _ in range(100):
            actions.append(agent.get_action(frame)["actions"])
            time.sleep(0.03)
    n = len(chunk)
    assert not agent.records[n - 1]["late"] and agent.records[n]["late"]
    np.testing.assert_array_equal(actions[n], chunk[-1])  # on_late=hold repeats the last action while waiting ...
    assert 0.3 <= agent.records[-1]["sent"] - agent.records[n]["sent"] + 0.03 < 0.6  # ... up to timeout_ms
    np.testing.assert_array_equal(actions[-1], np.where(agent.stop_zeroes, 0.0, chunk[-1]))  # then sends the stop action
    with pytest.raises(UserError, match="no answer"):  # and a new episode does not start
        agent.reset()
    # Position control without a stop action: nothing can be sent, so the first step ends the run at the timeout.
    position = {**loaded.metadata, "env": {**loaded.metadata["env"], "control_mode": "pd_joint_pos"}}
    agent = ChunkAgent(hung, position, ControllerConfig(hz=20, deadline_ms=20, timeout_ms=300))
    agent.reset()
    with pytest.raises(UserError, match="no answer"):
        agent.get_action(frame)
    with pytest.raises(UserError, match="prompt= is the instruction of a VLA bundle"):
        ChunkAgent(hung, loaded.metadata, ControllerConfig(), prompt="push the cube")
    with pytest.raises(UserError, match=r"timeout_ms=20 must be longer than the deadline \(25 ms\)"):
        ControllerConfig(hz=20, timeout_ms=20).check(4)


def test_a_request_the_server_refuses_stops_the_robot_and_says_why_in_one_line(bundle):
    loaded = Bundle.load(bundle)
    server = PolicyServer(loaded, port=0).start()
    try:
        agent = ChunkAgent(connect(server.url), loaded.metadata, ControllerConfig(hz=0))
        agent.reset()
        glitch = {"state": np.full(loaded.metadata["observation"]["state"]["shape"][1], np.nan, np.float32)}  # a sensor's NaN
        first = agent.get_action(glitch)["actions"]
        assert not first.any()  # the stop action (zero motion under delta control): no chunk came
        with pytest.raises(UserError) as said:
            agent.get_action(glitch)
    finally:
        server.stop()
    # was openpi's "Error in inference server:\nerror: ...", two lines, and "check the server" for the robot's NaN
    assert str(said.value) == (f"inference failed: the policy server at {server.url} refused the request: observation['state'] "
                               "contains NaN or inf; the robot was sent its stop action")


def test_a_request_refused_as_an_episode_ends_ends_the_run(bundle):
    loaded = Bundle.load(bundle)
    n = loaded.metadata["action"]["chunk_length"]
    good = {"state": np.zeros(loaded.metadata["observation"]["state"]["shape"][1], np.float32)}
    glitch = {"state": np.full_like(good["state"], np.nan)}
    server = PolicyServer(loaded, port=0).start()
    try:  # re-planning at every step, the last step's request (with the sensor's NaN) is in flight when the episode ends
        agent = ChunkAgent(connect(server.url), loaded.metadata, ControllerConfig(hz=0, replan_below=n - 1))
        agent.reset()
        agent.get_action(good)
        agent.get_action(glitch)
        with pytest.raises(UserError) as said:  # reset() dropped the refusal, and the next episode ran on
            agent.reset()
    finally:
        server.stop()
    assert str(said.value) == (f"inference failed: the policy server at {server.url} refused the request: observation['state'] "
                               "contains NaN or inf; the run ended with the episode it was for")


def test_a_server_whose_actions_are_not_a_chunk_of_the_robot_s_stops_the_robot_and_says_so(bundle):
    from openpi_client import msgpack_numpy

    loaded = Bundle.load(bundle)
    n, dims = loaded.metadata["action"]["chunk_length"], len(loaded.metadata["action"]["low"])
    replies = {  # what a server other than ours might answer; what the run ends with
        "NaN": (np.full((n, dims), np.nan, np.float32), "the policy server's actions hold NaN or inf"),  # went to the robot
        "flat": (np.full(dims, 0.5, np.float32), f"reply has actions of shape ({dims},), not a chunk"),  # 4 actions of 0.5s
        "wide": (np.zeros((n, dims + 3), np.float32), f"actions of shape ({n}, {dims + 3}), not a chunk of this robot's actions (n, {dims})"),
        "empty": (np.zeros((0, dims), np.float32), f"actions of shape (0, {dims})"),  # every step late, no word
    }
    frame = {"state": np.zeros(loaded.metadata["observation"]["state"]["shape"][1], np.float32)}
    for name, (actions, message) in replies.items():
        def answer(ws, actions=actions):
            ws.send(msgpack_numpy.packb(loaded.metadata))
            try:
                for _ in ws:
                    ws.send(msgpack_numpy.packb({"actions": actions}))
            except ConnectionClosed:
                pass

        with serving(answer) as url:
            client = connect(url)
            agent = ChunkAgent(client, loaded.metadata, ControllerConfig(hz=0))
            agent.reset()
            first = agent.get_action(frame)["actions"]
            with pytest.raises(UserError) as said:
                agent.get_action(frame)
            client.close()
        assert first.shape == (dims,) and not first.any(), name  # the stop action: zero motion under delta control
        assert message in str(said.value) and str(said.value).endswith("the robot was sent its stop action"), (name, str(said.value))


def test_a_server_on_an_ipv6_address_gives_a_url_that_connects(bundle):
    server = PolicyServer(Bundle.load(bundle), host="::1", port=0).start()
    try:  # was ws://::1:<port>, which no client parses
        assert server.url == f"ws://[::1]:{server.port}"
        assert connect(server.url).get_server_metadata()["env"]["task"] == "PushCube-v1"
        with urllib.request.urlopen(f"http://{server.address}/healthz") as r:  # the health URL serve prints
            assert r.status == 200
    finally:
        server.stop()


def test_a_stopped_server_has_freed_its_port_and_threads(bundle):
    loaded = Bundle.load(bundle)
    before = set(threading.enumerate())
    server = PolicyServer(loaded, port=0).start()
    client = connect(server.url)
    client.infer({"state": np.zeros(loaded.metadata["observation"]["state"]["shape"], np.float32)})
    server.stop()
    # stop() returned with the port still listening, and every server left its inference thread behind
    assert not {t.name for t in set(threading.enumerate()) - before} & {"policy-server", "inference_0"}
    PolicyServer(loaded, port=server.port).start().stop()  # was "address already in use"


def test_an_openpi_server_s_traceback_is_one_line():
    def openpi_like(ws):  # openpi's WebsocketPolicyServer on an exception in its policy
        from openpi_client import msgpack_numpy

        ws.send(msgpack_numpy.packb({"reset_pose": [0.0]}))
        ws.recv()
        ws.send("Traceback (most recent call last):\n  File \"serve_policy.py\", line 9, in infer\n"
                "KeyError: 'observation/exterior_image_1_left'\n")
        ws.close(1011, "Internal server error. Traceback included in previous frame.")

    with serving(openpi_like) as url, pytest.raises(UserError) as said:
        connect(url).infer({"state": np.zeros(3, np.float32)})  # what rpd teacher= and control ask
    # rpd ended with 'error: ... refused the request: Traceback (most recent call last):' and the traceback's lines
    assert str(said.value) == (f"the policy server at {url} refused the request: KeyError: 'observation/exterior_image_1_left' "
                               "(the last line of the traceback it sent)")


@pytest.mark.timeout(60)
def test_a_server_that_stops_answering_is_one_line_that_says_so(monkeypatch, caplog):
    """What rpd teacher=ws:// sees of a hung server (control's timeout_ms comes first): websockets' keepalive gives up."""
    import base64
    import hashlib
    import socket

    from openpi_client import msgpack_numpy

    monkeypatch.setattr(wire, "KEEPALIVE_S", 0.3, raising=False)  # 20 s, the default
    listener = socket.create_server(("127.0.0.1", 0))

    def hung() -> None:  # accepts, sends its metadata, then answers nothing, not even pings: a SIGSTOPped server
        conn, _ = listener.accept()
        key = re.search(rb"Sec-WebSocket-Key: (\S+)", conn.recv(4096)).group(1)
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        meta = msgpack_numpy.packb({"reset_pose": [0.0]})
        conn.sendall(bytes([0x82, len(meta)]) + meta)
        time.sleep(30)

    threading.Thread(target=hung, daemon=True).start()
    url = f"ws://127.0.0.1:{listener.getsockname()[1]}"
    with pytest.raises(UserError) as said:
        connect(url).infer({"state": np.zeros(3, np.float32)})
    listener.close()
    # was "closed the connection (sent 1011 (internal error) keepalive ping timeout; ...)", after websockets' logged traceback
    assert str(said.value) == (f"the policy server at {url} stopped answering: no reply to the connection's pings for 0.3 s "
                               "(a hung server, or the network to it is down)")
    time.sleep(0.5)  # websockets' keepalive thread logs its failure ("keepalive ping failed", a traceback) just after
    assert not [r.getMessage() for r in caplog.records if r.exc_info]


def test_a_server_that_goes_away_stops_the_robot_and_ends_the_run_in_one_line(bundle, cli_here, tmp_path):
    loaded = Bundle.load(bundle)
    server = PolicyServer(loaded, port=0).start()
    agent = ChunkAgent(connect(server.url), loaded.metadata, ControllerConfig(hz=20, deadline_ms=20, on_late="hold"))
    agent.reset()
    frame = {"state": np.zeros(loaded.metadata["observation"]["state"]["shape"][1], np.float32)}
    actions = [agent.get_action(frame)["actions"]]
    server.stop()
    with pytest.raises(UserError, match=f"the policy server at {server.url} closed the connection"):
        for _ in range(100):
            actions.append(agent.get_action(frame)["actions"])
    np.testing.assert_array_equal(actions[-1], np.where(agent.stop_zeroes, 0.0, actions[-2]))  # the stop action went out

    server = PolicyServer(loaded, port=0).start()

    def stop_in_the_second_episode() -> None:  # 8 requests an episode: 30 steps, 4 actions a chunk
        while server.stats["requests"] < 10:
            time.sleep(0.005)
        server.stop()

    threading.Thread(target=stop_in_the_second_episode, daemon=True).start()
    r = cli_here("control", f"server={server.url}", "episodes=3", "hz=0", "max_episode_steps=30", "name=gone")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.splitlines()[-1].startswith(f"error: inference failed: the policy server at {server.url} closed the connection")
    # What ran until then is kept, marked as stopped: the telemetry that shows what went wrong.
    (run,) = (tmp_path / "runs" / "control").glob("*-gone")
    assert r.stderr.splitlines()[-1].endswith(f"the run up to it is saved in {run}")
    c = json.loads((run / "control.json").read_text())
    assert "closed the connection" in c["stopped"] and 1 <= len(c["episodes"]) < 3 and c["timing"]["steps"] > 30 * len(c["episodes"])
    assert (run / "telemetry.csv").read_text().count("\n") == 1 + c["timing"]["steps"]
    table = cli_here("summary", "--name", "gone")
    assert "through the server unpaced (hz=0)" in table.stdout and "stopped early: inference failed: the policy server" in table.stdout, table.stdout
    # Stopped before any episode ended (control writes that as no episodes): still what stopped it, not "(incomplete run)".
    first = run.with_name(run.name.replace("-gone", "-gone-first"))
    shutil.copytree(run, first)
    (first / "control.json").write_text(json.dumps({**c, "summary": {"episodes": 0}, "episodes": []}))
    table = cli_here("summary", "--name", "gone").stdout
    assert f"{first.name}  no episode finished through the server unpaced (hz=0)" in table and "stopped early: inference failed" in table, table


def test_control_stopped_with_ctrl_c_stops_the_robot_and_keeps_the_run(bundle, tmp_path):
    # Ctrl-C dropped the run directory, telemetry and all, and sent the robot nothing: a failure stopped it, a person not
    proc = subprocess.Popen([*ROBODISTILL, "control", f"bundle={bundle}", "episodes=1000", "hz=0", "max_episode_steps=20", "name=c"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_MININTERVAL": "0.1"})  # the bar redrawn as at a terminal, not every 30 s
    seen = ""
    # Two episodes done: the bar's count, on stderr. Redrawn every 0.1 s, it may go from 1 to 3 without showing 2.
    while max(map(int, re.findall(r"\| *(\d+)/1000", seen)), default=0) < 2 and proc.poll() is None:
        seen += proc.stderr.read(64)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    (run,) = (tmp_path / "runs" / "control").glob("*-c")
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == (
        f"interrupted: the robot was sent its stop action; the run up to it is saved in {run}"), err[-2000:]
    c = json.loads((run / "control.json").read_text())
    assert c["stopped"] == "interrupted" and len(c["episodes"]) >= 2
    assert (run / "telemetry.csv").read_text().count("\n") == 1 + c["timing"]["steps"]


def test_the_stop_action_holds_the_arm_and_is_none_before_a_position_target(bundle):
    loaded = Bundle.load(bundle)
    agent = ChunkAgent(SlowPolicy(loaded, delay=0.0), loaded.metadata, ControllerConfig(hz=20))
    agent.reset()
    moving = agent.get_action({"state": np.zeros(loaded.metadata["observation"]["state"]["shape"][1], np.float32)})["actions"]
    np.testing.assert_array_equal(agent.stop_command(), np.where(agent.stop_zeroes, 0.0, moving))  # the gripper keeps its command
    position = {**loaded.metadata, "env": {**loaded.metadata["env"], "control_mode": "pd_joint_pos"}}
    assert ChunkAgent(SlowPolicy(loaded, delay=0.0), position, ControllerConfig(hz=20)).stop_command() is None


def test_teachers_from_a_checkpoint_a_server_or_nothing(checkpoint, server):
    from robodistill.policies.teachers import load_teacher

    with make_env(ENV) as env:
        assert load_teacher("none", env) is None
        history = {"state": env.reset(seed=0)["state"][:, None].repeat(3, 2, 1)}  # (3, 2, D): 3 rows, obs_horizon 2
        local = load_teacher(str(checkpoint), env)
        # What each teacher would execute before asking again: its chunk's first act_horizon actions.
        assert local.policy.sampler.name == "consistency" and local.act(history).shape == (3, local.act_horizon, 4)
        remote = load_teacher(f"ws://127.0.0.1:{server}", env, api_key="sesame")
        actions = remote.act(history)
        assert remote.obs_horizon == 2 and remote.act_horizon > 1  # from the bundle's metadata
        assert actions.shape == (3, remote.act_horizon, 4) and actions.abs().max() <= 1


def test_reading_a_served_policy_s_env_leaves_no_connection_open(bundle):
    server = PolicyServer(Bundle.load(bundle), port=0).start()
    try:
        before = set(threading.enumerate())
        assert served_env(server.url)["task"] == "PushCube-v1"  # what rpd teacher=ws://... reads before it starts
        # its connection (websockets' receiving and keepalive threads) stayed open, idle, for the whole run
        deadline = time.monotonic() + 5  # the keepalive thread ends just after the connection closes
        while not set(threading.enumerate()) <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(threading.enumerate()) <= before, set(threading.enumerate()) - before
    finally:
        server.stop()


def test_rpd_from_a_served_teacher_acts_in_the_env_its_metadata_records(server, cli, tmp_path):
    # The bundle's policy trained on 30-step episodes (its metadata's env), not PushCube's default 50.
    r = cli("rpd", f"teacher=ws://127.0.0.1:{server}", "total_steps=40", "n_steps=20", "batch_size=20", "n_epochs=1",
            "hidden=[16]", "obs_norm_steps=20", "eval_every=0", "eval_episodes=1", "progress=false", "name=ws",
            env={"ROBODISTILL_API_KEY": "sesame"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "as the teacher was trained: env.max_episode_steps=30" in r.stdout
    (run,) = (tmp_path / "runs" / "rpd").glob("*-ws")
    assert PPO.load(run / "student.zip", device="cpu").robodistill_env["max_episode_steps"] == 30


def test_rpd_whose_served_teacher_goes_away_says_how_to_continue_in_one_line(bundle, cli_here):
    server = PolicyServer(Bundle.load(bundle), port=0).start()

    def stop_at_the_first_labels() -> None:
        while server.stats["requests"] < 1:
            time.sleep(0.005)
        server.stop()

    threading.Thread(target=stop_at_the_first_labels, daemon=True).start()
    r = cli_here("rpd", f"teacher={server.url}", "total_steps=4000", "n_steps=20", "batch_size=20", "n_epochs=1", "hidden=[16]",
                 "obs_norm_steps=20", "eval_every=0", "eval_episodes=1", "progress=false", "name=gone")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.splitlines()[-1]
    assert line.startswith(f"error: the policy server at {server.url} closed the connection"), line
    # gone at the first labels, before the first checkpoint (test_cli has a run stopped after one)
    assert line.endswith("it stopped before its first checkpoint, so there is nothing to resume; the same command starts it again"), line


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_export_the_disk_has_no_room_for_says_so_and_keeps_the_bundle_it_would_replace(checkpoint, bundle, tmp_path, fmt):
    # onnx ended in OSError's traceback; TorchScript's zip writer aborted the process ('unexpected pos', core dumped).
    import os
    import resource

    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = subprocess.run([*ROBODISTILL, "export", f"ckpt={checkpoint}", "sampler=consistency", "steps=2", f"format={fmt}",
                        f"out={out}", "overwrite=true"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, resource.RLIM_INFINITY)))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"error: could not write {out}: File too large (the bundle in bundle as it was is kept); raise the file-size limit (ulimit -f)")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and os.listdir(tmp_path) == ["bundle", "runs"]


def test_a_loop_that_kept_a_lower_rate_says_whether_the_robot_or_the_policy_slowed_it():
    from robodistill.deploy.controller import timing_table

    run = {"hz": 50.0, "steps": 100, "late_steps": 0, "deadline_ms": 200.0, "on_late": "hold", "requests": 100,
           "skipped_actions": 0, "period_ms_p50_p99": [40.0, 45.0], "jitter_ms_p50_p99_max": [20.0, 25.0, 30.0],
           "round_trip_ms_p50_p99": [35.0, 40.0], "server_infer_ms_p50_p99": [33.0, 38.0]}
    robot = timing_table({**run, "wait_ms_p50_p99": [1.0, 2.0]})
    policy = timing_table({**run, "wait_ms_p50_p99": [35.0, 40.0]})
    assert "it kept 25 Hz, not 50: the robot's step takes longer than a period; lower hz=" in robot
    # a loop waiting (under a deadline longer than a period) on a policy slower than a period blamed the robot
    assert "it kept 25 Hz, not 50: its steps wait p50 35.0 ms for the policy's actions (deadline_ms 200)" in policy, policy


def test_control_s_telemetry_the_disk_has_no_room_for_is_one_line(bundle, cli_here, tmp_path):
    with disk_full_past(4_000):  # hydra's files fit, the telemetry of 100 steps does not
        r = cli_here("control", f"bundle={bundle}", "hz=0", "episodes=1", "max_episode_steps=100", "name=full")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]  # was OSError's, and a cut-short table
    assert re.search(r"^error: could not write .*telemetry.csv: File too large \(there is no telemetry.csv yet\); raise the "
                     r"file-size limit", r.stderr, re.M), r.stderr[-2000:]
    assert not list(tmp_path.glob("runs/control/*/telemetry.csv"))


def test_a_teacher_server_whose_actions_are_not_the_env_s_says_so_in_one_line():
    from openpi_client import msgpack_numpy

    from robodistill.policies.teachers import RemoteTeacher

    replies = {  # what rpd teacher=ws:// ended in: the student trained on NaN until its own actions were NaN (a torch
        # traceback), a numpy broadcast traceback, and a KeyError
        "NaN": (np.full((8, 4), np.nan, np.float32), "the policy server's actions hold NaN or inf"),
        "wide": (np.zeros((8, 7), np.float32), "the policy server's reply has actions of shape (8, 7), not a chunk of this env's actions (n, 4)"),
        "none": (None, "the policy server's reply has no 'actions', not a chunk of this env's actions (n, 4)"),
    }
    for name, (actions, message) in replies.items():
        def answer(ws, actions=actions):
            ws.send(msgpack_numpy.packb({}))  # an openpi server's metadata: no robodistill fields
            try:
                for _ in ws:
                    ws.send(msgpack_numpy.packb({"actions": actions} if actions is not None else {"action": 0}))
            except ConnectionClosed:
                pass

        with serving(answer) as url:
            teacher = RemoteTeacher(url, action_dims=4)
            with pytest.raises(UserError) as said:
                teacher.act({"state": torch.zeros(2, 1, 35)})
            teacher.client.close()
        assert str(said.value) == f"teacher={url}: {message}", (name, str(said.value))


@pytest.mark.timeout(60)
def test_a_teacher_server_that_takes_requests_and_answers_none_ends_the_run_in_one_line():
    # rpd waited for good: the server's websocket library still answered the keepalive's pings
    from openpi_client import msgpack_numpy

    from robodistill.policies.teachers import RemoteTeacher

    def silent(ws):
        ws.send(msgpack_numpy.packb({}))
        try:
            for _ in ws:  # reads every request, answers none
                pass
        except ConnectionClosed:
            pass

    with serving(silent) as url:
        teacher = RemoteTeacher(url, action_dims=4, timeout_ms=300)
        with pytest.raises(CutShort) as said:
            teacher.act({"state": torch.zeros(1, 1, 35)})
        teacher.client.close()
    assert str(said.value) == (f"the policy server at {url} did not answer a request within 300 ms (timeout_ms): a hung or "
                               "overloaded server; check it, or raise timeout_ms for a slow one")


def test_a_teacher_server_whose_metadata_holds_other_values_is_one_line_or_single_frames():
    from robodistill.policies.teachers import RemoteTeacher

    cases = {  # an openpi server's metadata holds whatever its config does: was AttributeError's or ValueError's traceback
        "policy a name": ({"policy": "pi0", "action": {"chunk_length": 5}}, (1, 5, True)),
        "action a list": ({"action": [1, 2]}, (1, 1, True)),
        "ours": ({"policy": {"obs_horizon": 2}, "action": {"chunk_length": np.int64(8)}}, (2, 8, False)),
        "a word": ({"policy": {"obs_horizon": "two"}}, "the server's metadata says policy.obs_horizon='two', not a count >= 1"),
        "zero": ({"action": {"chunk_length": 0}}, "the server's metadata says action.chunk_length=0, not a count >= 1"),
    }
    for name, (metadata, expected) in cases.items():
        with serving(opens_with(metadata)) as url:
            if isinstance(expected, str):
                with pytest.raises(UserError) as said:
                    RemoteTeacher(url, action_dims=4)
                assert str(said.value).startswith(f"teacher={url}: {expected}"), (name, str(said.value))
                continue
            teacher = RemoteTeacher(url, action_dims=4)
            teacher.client.close()
        assert (teacher.obs_horizon, teacher.act_horizon, teacher.single_frame) == expected, name
