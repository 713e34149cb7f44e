"""The wire: openpi's websocket policy protocol, client side (openpi-client's codec and client).

At the bottom of the import graph: the remote teacher (policies) and the controller (deploy) both
connect through here; the server (deploy) speaks the same protocol.
"""

from __future__ import annotations

import os

from openpi_client import base_policy

from robodistill.errors import CutShort, UserError

API_KEY_ENV = "ROBODISTILL_API_KEY"


class ServedPolicy(base_policy.BasePolicy):
    """openpi's `WebsocketClientPolicy` for the server at `url`, whose going away mid-run (killed,
    stopped, restarted) is one line naming it, not websockets' traceback from deep in the caller's loop."""

    def __init__(self, client: base_policy.BasePolicy, url: str):
        self.client, self.url = client, url

    def get_server_metadata(self) -> dict:
        return self.client.get_server_metadata()

    def infer(self, obs: dict) -> dict:
        from websockets.exceptions import ConnectionClosed

        try:
            return self.client.infer(obs)
        except ConnectionClosed as err:
            raise CutShort(f"the policy server at {self.url} closed the connection ({err})") from err
        except RuntimeError as err:  # openpi's client raises the server's text frame as "Error in inference server:\n<text>"
            said = str(err).partition("Error in inference server:\n")[2]
            if not said:
                raise
            raise UserError(f"the policy server at {self.url} refused the request: {said.removeprefix('error: ')}") from err

    def reset(self) -> None:
        self.client.reset()


def connect(url: str, api_key: str | None = None) -> ServedPolicy:
    """`WebsocketClientPolicy` with the failures a user can fix turned into one clear line.
    `api_key` defaults to the ROBODISTILL_API_KEY env var."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

    if not url.startswith(("ws://", "wss://")):
        raise UserError(f"{url!r} is not a websocket URL: use e.g. ws://127.0.0.1:8000")
    api_key = api_key or os.environ.get(API_KEY_ENV)
    try:
        return ServedPolicy(WebsocketClientPolicy(url, api_key=api_key), url)
    except InvalidStatus as err:
        code = err.response.status_code
        hint = f": set api_key= (or {API_KEY_ENV}) to the server's key" if code == 401 else ""
        raise UserError(f"the server at {url} refused the connection (HTTP {code}){hint}") from err
    except InvalidHandshake as err:  # something answers there, but not in websocket (e.g. a plain HTTP server)
        raise UserError(f"{url} is not a websocket policy server ({err}): check the port, or start one with "
                        "`robodistill serve bundle=<dir>`") from err
    except (OSError, InvalidURI) as err:
        raise UserError(f"no policy server at {url} ({err}): start one with `robodistill serve bundle=<dir>`") from err


def served_env(url: str, api_key: str | None = None) -> dict:
    """The env the policy served at `url` was trained in, as its metadata records it (a robodistill
    bundle's `env`: task, control mode, episode limit, ...); {} from a server whose metadata has none (openpi's)."""
    meta = connect(url, api_key).get_server_metadata()
    env = meta.get("env") if isinstance(meta, dict) else None
    return env if isinstance(env, dict) else {}
