"""The wire: openpi's websocket policy protocol, client side (openpi-client's codec and client).

At the bottom of the import graph: the remote teacher (policies) and the controller (deploy) both
connect through here; the server (deploy) speaks the same protocol.
"""

from __future__ import annotations

import logging
import os
from urllib.parse import urlsplit

import numpy as np
from openpi_client import base_policy, msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from robodistill.errors import CutShort, UserError

API_KEY_ENV = "ROBODISTILL_API_KEY"
METADATA_TIMEOUT_S = 10.0  # a policy server sends its metadata as soon as it accepts; websockets' own handshake waits as long
KEEPALIVE_S = 20.0  # websockets' pings (its defaults): a server that answers none for this long has stopped answering
# websockets logs its keepalive's failure with a traceback; the request it fails says what happened, in one line
_WEBSOCKETS_LOG = logging.getLogger(f"{__name__}.websockets")
_WEBSOCKETS_LOG.setLevel(logging.CRITICAL)


class _Client(WebsocketClientPolicy):
    """openpi's `WebsocketClientPolicy`, whose wait for the server's metadata is bounded and checked: its own waits
    forever on a websocket server that sends nothing on connect, and ends in a traceback from msgpack or websockets
    on one that sends text or other bytes, or closes at once. Its wait for a reply is bounded by `timeout_s` too."""

    timeout_s: float | None = None

    def infer(self, obs: dict) -> dict:
        # openpi's, but for the timeout: a server that takes a request and never answers it still answers the keepalive's
        # pings (its websocket library does), so the caller waited for good
        self._ws.send(self._packer.pack(obs))
        response = self._ws.recv(timeout=self.timeout_s)
        if isinstance(response, str):
            raise RuntimeError(f"Error in inference server:\n{response}")
        return msgpack_numpy.unpackb(response)

    def _wait_for_server(self):
        headers = {"Authorization": f"Api-Key {self._api_key}"} if self._api_key else None
        conn = ws_connect(self._uri, compression=None, max_size=None, additional_headers=headers,
                          ping_interval=KEEPALIVE_S, ping_timeout=KEEPALIVE_S, logger=_WEBSOCKETS_LOG)
        fix = "check the port, or start one with `robodistill serve bundle=<dir>`"
        try:
            frame = conn.recv(timeout=METADATA_TIMEOUT_S)
        except TimeoutError as err:
            conn.close()
            raise UserError(f"{self._uri} sent no metadata within {METADATA_TIMEOUT_S:g} s of connecting: it is not a "
                            f"policy server, or one that is stuck; {fix}") from err
        except ConnectionClosed as err:
            raise UserError(f"{self._uri} closed the connection before sending its metadata ({err})") from err
        opened = f"text ({frame.strip()[:200]!r})"
        if not isinstance(frame, str):
            try:
                metadata = msgpack_numpy.unpackb(frame)
            except Exception:  # noqa: BLE001 - msgpack's errors are of several types; any means the same here
                opened = f"{len(frame)} bytes that are not msgpack"
            else:
                if isinstance(metadata, dict):
                    return conn, metadata
                opened = f"a msgpack {type(metadata).__name__}"
        conn.close()
        raise UserError(f"{self._uri} is not a policy server: it opened with {opened}, not metadata; {fix}")


class ServedPolicy(base_policy.BasePolicy):
    """openpi's `WebsocketClientPolicy` for the server at `url`, whose going away mid-run (killed,
    stopped, restarted) is one line naming it, not websockets' traceback from deep in the caller's loop."""

    def __init__(self, client: base_policy.BasePolicy, url: str, timeout_ms: float | None = None):
        self.client, self.url, self.timeout_ms = client, url, timeout_ms

    def get_server_metadata(self) -> dict:
        return self.client.get_server_metadata()

    def infer(self, obs: dict) -> dict:
        try:
            return self.client.infer(obs)
        except TimeoutError as err:
            raise CutShort(f"the policy server at {self.url} did not answer a request within {self.timeout_ms:g} ms (timeout_ms): "
                           "a hung or overloaded server; check it, or raise timeout_ms for a slow one") from err
        except ConnectionClosed as err:
            if err.sent is not None and err.sent.reason == "keepalive ping timeout":  # this side gave up, in websockets' words
                raise CutShort(f"the policy server at {self.url} stopped answering: no reply to the connection's pings for "
                               f"{KEEPALIVE_S:g} s (a hung server, or the network to it is down)") from err
            raise CutShort(f"the policy server at {self.url} closed the connection ({err})") from err
        except RuntimeError as err:  # openpi's client raises the server's text frame as "Error in inference server:\n<text>"
            said = str(err).partition("Error in inference server:\n")[2]
            if not said:
                raise
            lines = said.strip().splitlines()
            if len(lines) > 1:  # openpi's server sends its exception's whole traceback (then closes the connection)
                said = f"{lines[-1]} (the last line of the traceback it sent)"
            raise UserError(f"the policy server at {self.url} refused the request: {said.removeprefix('error: ')}") from err

    def reset(self) -> None:
        self.client.reset()

    def close(self) -> None:
        self.client._ws.close()


def chunk_in(reply, dims: int, whose: str) -> np.ndarray:
    """The actions of a policy server's reply as a finite (n, dims) chunk of `whose` actions, or a UserError saying what
    came instead: a chunk of another shape was broadcast (a flat (dims,) one into actions of one value each), and NaN
    passes a clamp and a distillation loss."""
    actions = reply.get("actions") if isinstance(reply, dict) else None
    try:
        chunk = np.asarray(actions, np.float32)
        got = "no 'actions'" if actions is None else f"actions of shape {chunk.shape}"
    except (TypeError, ValueError):
        chunk, got = None, f"'actions' that are not numbers ({type(actions).__name__})"
    if chunk is None or chunk.ndim != 2 or len(chunk) == 0 or chunk.shape[1] != dims:
        raise UserError(f"the policy server's reply has {got}, not a chunk of {whose} actions (n, {dims})")
    if not np.isfinite(chunk).all():
        raise UserError("the policy server's actions hold NaN or inf")
    return chunk


def connect(url: str, api_key: str | None = None, timeout_ms: float | None = None) -> ServedPolicy:
    """`WebsocketClientPolicy` with the failures a user can fix turned into one clear line.
    `api_key` defaults to the ROBODISTILL_API_KEY env var; a request unanswered for `timeout_ms` (None: no limit, for a
    caller that bounds its own waits, as `control` does) ends in one."""
    from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
    from websockets.uri import parse_uri

    try:
        parse_uri(url)
        if urlsplit(url).port == 0:  # websockets reads it as no port, and connected to 80 (or 443)
            raise ValueError("port 0 is no server's: `robodistill serve port=0` prints the port it took")
    except (InvalidURI, ValueError) as err:  # ValueError: urllib's, for a port out of range or not a number
        reason = err.msg if isinstance(err, InvalidURI) else str(err)
        raise UserError(f"{url!r} is not a websocket URL ({reason}): use e.g. ws://127.0.0.1:8000") from err
    api_key = api_key or os.environ.get(API_KEY_ENV)
    try:
        client = _Client(url, api_key=api_key)
    except InvalidStatus as err:
        code = err.response.status_code
        hint = f": set api_key= (or {API_KEY_ENV}) to the server's key" if code == 401 else ""
        raise UserError(f"the server at {url} refused the connection (HTTP {code}){hint}") from err
    except InvalidHandshake as err:  # something answers there, but not in websocket (e.g. a plain HTTP server)
        raise UserError(f"{url} is not a websocket policy server ({err}): check the port, or start one with "
                        "`robodistill serve bundle=<dir>`") from err
    except OSError as err:
        raise UserError(f"no policy server at {url} ({err}): start one with `robodistill serve bundle=<dir>`") from err
    client.timeout_s = None if timeout_ms is None else timeout_ms / 1e3
    return ServedPolicy(client, url, timeout_ms)


def served_env(url: str, api_key: str | None = None) -> dict:
    """The env the policy served at `url` was trained in, as its metadata records it (a robodistill
    bundle's `env`: task, control mode, episode limit, ...); {} from a server whose metadata has none (openpi's)."""
    policy = connect(url, api_key)
    policy.close()  # the metadata is all it needs: open, the connection (and its two threads) stayed for the whole run
    env = policy.get_server_metadata().get("env")
    return env if isinstance(env, dict) else {}
