"""`robodistill serve bundle=<dir>`: a bundle behind openpi's websocket policy protocol.

The protocol, as openpi's `WebsocketPolicyServer` and `openpi_client.WebsocketClientPolicy` speak it:
  - on connect the server sends its metadata (the bundle's metadata.json), msgpack-encoded;
  - each request is one binary frame, a msgpack-numpy dict of observations (openpi_client's codec:
    no pickle); the reply is `{"actions": (chunk_length, A) float32, "server_timing": {...}}`;
  - an error is one text frame; unlike openpi's server, the connection stays open for the next
    request, so a client can fix its input and go on;
  - `GET /healthz` answers 200; with an API key, the websocket handshake needs the header
    `Authorization: Api-Key <key>` (what `WebsocketClientPolicy(api_key=...)` sends), else 401;
  - a frame over `max_message_mb` closes that connection with code 1009 (the websocket rule), the
    limit in its reason; other clients are not affected.

A VLA bundle takes the instruction as openpi clients send it: `prompt` (text) in the observation
dict (default: the exported task's instruction).

Observations are one env's history without a batch dim (`metadata["observation"]`: key -> shape,
dtype). Requests from all clients go to a batcher that stacks whatever is waiting into one graph
call (the graph's batch dim is free), so concurrent clients share inference instead of queueing
behind each other. Each connection draws the sampler's noise from its own generator seeded with
`seed`, so a client's actions do not depend on what other clients send.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import msgpack
import numpy as np
from omegaconf import DictConfig
from openpi_client import msgpack_numpy
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

import robodistill
from robodistill.errors import UserError
from robodistill.policies.bundle import Bundle, ObservationError, check_observation
from robodistill.summary import counted, sampler_words
from robodistill.wire import API_KEY_ENV



@dataclass
class ServeConfig:
    """`robodistill serve` (configs/serve.yaml)."""

    bundle: str = ""  # a bundle directory (robodistill export)
    host: str = "127.0.0.1"  # 0.0.0.0 to accept other machines (then set an API key)
    port: int = 8000  # 0: any free port (printed)
    api_key: str | None = None  # required from clients if set; default: the ROBODISTILL_API_KEY env var
    max_message_mb: float = 16.0  # larger frames close their connection (code 1009)
    max_batch: int = 32  # requests stacked into one graph call
    threads: int = 1  # inference threads of the graph runtime
    seed: int = 0  # each connection's noise generator starts from this seed
    name: str = "serve"


class RequestError(UserError):
    """A frame that is not a request (text, not msgpack, not a dict)."""


def _unpack_array(obj: dict):
    """openpi's decoding, refusing arrays that hold Python objects: it lays any dtype over the frame's bytes, so an
    object array's elements would be those bytes taken as pointers, and reading one would read (or crash) the
    server's memory wherever a crafted frame points."""
    if b"__ndarray__" in obj and np.dtype(obj[b"dtype"]).hasobject:
        raise RequestError(f"arrays of Python objects (dtype {np.dtype(obj[b'dtype'])}) cannot be sent: send numbers, or text as a str")
    return msgpack_numpy.unpack_array(obj)


@dataclass
class _Pending:
    obs: dict[str, np.ndarray]
    noise: np.ndarray | None
    future: asyncio.Future


def _listen_error(host: str, port: int, err: OSError) -> UserError:
    fix = "choose another port=" if err.errno == errno.EADDRINUSE else "check host= (an address of this machine, e.g. 0.0.0.0)"
    return UserError(f"cannot listen on {host}:{port} ({err.strerror}): {fix}")


class PolicyServer:
    """Serves one bundle; `serve_forever()` in an event loop or `start()` in a background thread."""

    def __init__(self, bundle: Bundle, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 max_message_mb: float = 16.0, max_batch: int = 32, seed: int = 0):
        if max_batch < 1:
            raise UserError(f"max_batch={max_batch} must be >= 1")
        if max_message_mb <= 0:
            raise UserError(f"max_message_mb={max_message_mb} must be > 0")
        if seed < 0:  # numpy refuses it at every connection, which websockets then closes with an internal error
            raise UserError(f"seed={seed} must be >= 0: each connection's noise generator starts from it")
        self.bundle, self.host, self.port = bundle, host, port
        self.api_key, self.seed, self.max_batch = api_key or None, seed, max_batch
        self.max_bytes = int(max_message_mb * 2**20)
        self.metadata = {**bundle.metadata, "server": {"robodistill_version": robodistill.__version__,
                                                       "api_key_required": bool(self.api_key),
                                                       "max_message_bytes": self.max_bytes}}
        self.stats = {"connections": 0, "requests": 0, "errors": 0, "batches": 0}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="inference")
        # A VLA bundle embeds a new prompt's text (milliseconds to seconds): off the event loop, or every client waits.
        self._text_pool = ThreadPoolExecutor(1, thread_name_prefix="prompts") if bundle.prompt is not None else None
        if bundle.prompt is not None:  # seconds to load: now, not inside a client's first request and its deadline
            bundle.text_encoder()
        self._error: BaseException | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- HTTP side: health and authentication, before the websocket handshake
    def _process_request(self, connection: ServerConnection, request):
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "OK\n")
        if self.api_key:
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Api-Key {self.api_key}".encode()):
                return connection.respond(HTTPStatus.UNAUTHORIZED,
                                          "missing or wrong API key: send the header 'Authorization: Api-Key <key>'\n")
        return None

    # ---- one connection
    async def _handle(self, ws: ServerConnection) -> None:
        self.stats["connections"] += 1
        rng = np.random.default_rng(self.seed)
        await ws.send(msgpack_numpy.packb(self.metadata))
        try:
            async for message in ws:
                start = time.perf_counter()
                try:
                    obs = (self._decode(message) if self._text_pool is None else
                           await asyncio.get_running_loop().run_in_executor(self._text_pool, self._decode, message))
                    pending = _Pending(obs, self.bundle.noise(1, rng), asyncio.get_running_loop().create_future())
                    await self._queue.put(pending)
                    actions, infer_ms, batch = await pending.future
                except UserError as err:
                    self.stats["errors"] += 1
                    await ws.send(f"error: {err}")
                    continue
                except Exception as err:  # a bug must not take the server down for everyone
                    self.stats["errors"] += 1
                    await ws.send(f"error: internal server error ({type(err).__name__}: {err})")
                    continue
                self.stats["requests"] += 1
                total_ms = (time.perf_counter() - start) * 1e3
                await ws.send(msgpack_numpy.packb({
                    "actions": actions,
                    "server_timing": {"infer_ms": infer_ms, "total_ms": total_ms, "batch": batch},
                }))
        except ConnectionClosed:
            pass

    def _decode(self, message) -> dict[str, np.ndarray]:
        if isinstance(message, str):
            raise RequestError("a text frame is not a request: send a binary msgpack-numpy dict of observations "
                               "(openpi_client.msgpack_numpy.packb)")
        try:
            obs = msgpack.unpackb(message, object_hook=_unpack_array)
        except RequestError:
            raise
        except Exception as err:
            raise RequestError(f"malformed frame, not msgpack-numpy ({type(err).__name__}{': ' + str(err) if str(err) else ''})") from err
        arrays = check_observation(self.bundle.instruct(obs, batched=False), self.bundle.observation, batched=False)
        return {k: np.array(v) for k, v in arrays.items()}  # writable copies (the wire buffers are read-only)

    # ---- inference: stack whatever is waiting into one graph call
    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            obs = {k: np.concatenate([p.obs[k] for p in batch]) for k in self.bundle.observation}
            noise = None if batch[0].noise is None else np.concatenate([p.noise for p in batch])
            start = time.perf_counter()
            try:
                actions = await loop.run_in_executor(self._pool, self.bundle.infer, obs, noise)
            except Exception as err:
                for p in batch:
                    p.future.set_exception(err)
                continue
            infer_ms = (time.perf_counter() - start) * 1e3
            self.stats["batches"] += 1
            for i, p in enumerate(batch):
                if np.isfinite(actions[i]).all():
                    p.future.set_result((actions[i], infer_ms, len(batch)))
                else:  # finite inputs that overflow inside the graph (1e38); NaN passes its clamp to the action bounds
                    p.future.set_exception(ObservationError(
                        "the policy's actions for this observation are not finite: its values are far outside those it was "
                        "trained on (check their units and order against the bundle's observation)"))

    async def serve_forever(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = self._loop.create_future()
        self._queue = asyncio.Queue()
        batcher = asyncio.create_task(self._batcher())
        try:
            async with serve(self._handle, self.host, self.port, process_request=self._process_request,
                             max_size=self.max_bytes, compression=None) as server:
                self.port = server.sockets[0].getsockname()[1]
                self._ready.set()
                await self._stop
        finally:  # every handler has had its answer: nothing is left for the pools' threads, which would outlive the server
            batcher.cancel()
            for pool in (self._pool, self._text_pool):
                if pool is not None:
                    pool.shutdown()

    def start(self) -> "PolicyServer":
        """Serve from a daemon thread; returns once the port is bound (`self.port`, `self.url`)."""
        def run() -> None:
            try:
                asyncio.run(self.serve_forever())
            except BaseException as err:  # noqa: BLE001 - handed to start(), which raises it
                self._error = err
                self._ready.set()

        self._thread = threading.Thread(target=run, daemon=True, name="policy-server")
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError("the policy server did not start within 30 s")
        if isinstance(self._error, OSError):
            raise _listen_error(self.host, self.port, self._error) from self._error
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        """Stop serving; a server from `start()` is stopped when this returns: its connections closed (websockets
        waits up to 10 s for each client's reply) and its port free to bind again."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(lambda: self._stop.done() or self._stop.set_result(None))
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def url(self) -> str:
        return f"ws://{self.address}"

    @property
    def address(self) -> str:
        """host:port as a URL writes it: an IPv6 host in brackets (ws://::1:8000 is no URL)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def main(cfg: DictConfig) -> None:
    if not cfg.bundle:
        raise UserError("bundle=<dir> is required: a directory written by `robodistill export`")
    if not 0 <= cfg.port < 65536:
        raise UserError(f"port={cfg.port} must be between 0 and 65535")
    if cfg.threads < 1:  # onnxruntime would read 0 as all cores
        raise UserError(f"threads={cfg.threads} must be >= 1: the graph runtime's inference threads")
    bundle = Bundle.load(Path(cfg.bundle), threads=int(cfg.threads))
    logging.getLogger("websockets").setLevel(logging.WARNING)  # one INFO line per connection otherwise
    api_key = cfg.api_key or os.environ.get(API_KEY_ENV)
    server = PolicyServer(bundle, cfg.host, int(cfg.port), api_key, float(cfg.max_message_mb), int(cfg.max_batch), int(cfg.seed))

    async def run() -> None:
        task = asyncio.create_task(server.serve_forever())
        while not server._ready.is_set():
            if task.done():
                await task  # it failed to bind: raise why
            await asyncio.sleep(0.02)
        for sig in (signal.SIGTERM, signal.SIGINT):  # a clean stop between batches, with the counts printed
            asyncio.get_running_loop().add_signal_handler(sig, server.stop)
        m = bundle.metadata
        print(f"serving {cfg.bundle} ({m['env']['task']}, {sampler_words(m['policy']['sampler'], m['policy']['steps'])}) "
              f"on {server.url}  health: http://{server.address}/healthz"
              f"{'  (API key required)' if api_key else ''}", flush=True)
        await task

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    except OSError as err:
        raise _listen_error(cfg.host, cfg.port, err) from err
    s = server.stats
    print(f"served {counted(s['requests'], 'request')} in {counted(s['batches'], 'graph call')} to "
          f"{counted(s['connections'], 'connection')}; {counted(s['errors'], 'error')}")
