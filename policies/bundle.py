"""Deploy bundles, read side: a directory written by `robodistill export`, run without the training code.

    <bundle>/policy.onnx | policy.ts    the whole policy as one graph (normalisation, encoder, the
                                        unrolled sampler, unnormalisation, clamping to the bounds)
    <bundle>/metadata.json              what goes in and out, the env it drives, where it came from

The graph's inputs are the observation history (`metadata["observation"]`: key -> shape without
the batch dim, dtype) and, for a diffusion policy, `noise` (`metadata["noise"]`): the sampler's
Gaussian draws, supplied by the caller so that a seeded generator makes every call reproducible
(an RL student's mean action takes none: `metadata["noise"]` is null). Its output `actions` is
(B, chunk_length, A) in env units.

A VLA bundle also takes `instruction` (the sentence embedding of the task instruction) and says so
in `metadata["prompt"]`: callers may send `prompt` (text, as openpi clients do) instead, or nothing
for the exported task's default; the embeddings of the training phrasings are in the metadata, and
other text goes through the same frozen sentence encoder the VLA was trained with.

`metadata.json` records the sha256 of every file in the bundle and a checksum of its own content;
`Bundle.load` refuses a bundle whose files do not match. `BundlePolicy` makes a bundle a `Policy`, so
`robodistill eval policy=<bundle dir>` evaluates exactly what the server serves.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from robodistill.errors import UserError
from robodistill.policies.base import check_trained_on, run_output

FORMAT = "robodistill-bundle-v1"
METADATA = "metadata.json"
GRAPH_FILES = {"onnx": "policy.onnx", "torchscript": "policy.ts"}
MAX_PROMPT_CHARS = 1000  # a VLA bundle's observation["prompt"]: an instruction, not a document


class BundleError(UserError):
    """A bundle that cannot be used: missing, tampered, or from another format."""


class ObservationError(UserError):
    """An observation that does not fit the bundle (missing key, shape, dtype, non-finite)."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def metadata_checksum(metadata: dict) -> str:
    """sha256 of the metadata without its own `checksum` field, in a canonical JSON form."""
    body = {k: v for k, v in metadata.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_observation(obs: dict, spec: dict, batched: bool) -> dict[str, np.ndarray]:
    """The observation arrays the graph takes, or an ObservationError that says what to send.

    :param spec: `metadata["observation"]`, key -> {"shape", "dtype"} without the batch dim.
    :param batched: arrays carry a leading batch dim (in-process), or not (one request on the wire).
    """
    if not isinstance(obs, dict):
        raise ObservationError(f"an observation must be a dict of arrays with keys {sorted(spec)}, got {type(obs).__name__}")
    missing = [k for k in spec if k not in obs]
    if missing:
        raise ObservationError(f"observation is missing key(s) {missing}; this policy takes {_describe(spec)}")
    out = {}
    batch = None
    for key, s in spec.items():
        x = obs[key]
        if not isinstance(x, np.ndarray):
            raise ObservationError(f"observation['{key}'] must be a numpy array of {_describe({key: s})}, got {type(x).__name__}")
        shape = tuple(x.shape[1:] if batched else x.shape)
        image = s["dtype"] == "uint8" and len(s["shape"]) == 4  # camera frames: (history, H, W, C) pixels
        if shape != tuple(s["shape"]) or (batched and x.ndim == 0):
            want = ("(B, " if batched else "(") + ", ".join(map(str, s["shape"])) + ")"
            channels_first = image and shape[:-3] + shape[-2:] + shape[-3:-2] == tuple(s["shape"])
            why = ("images go channel-last, (H, W, C): send np.moveaxis(x, -3, -1)" if channels_first else
                   f"the last {s['shape'][0]} observations, oldest first")
            raise ObservationError(f"observation['{key}'] has shape {tuple(x.shape)}, expected {want}: {why}")
        if x.dtype != np.dtype(s["dtype"]):
            # np.asarray(x, dtype=np.uint8) of an image scaled to [0, 1] is all zeros and ones: a black frame, unsaid
            fix = ("pixels 0-255: send an image in [0, 1] as (x * 255).round().astype(np.uint8), one in 0-255 as x.astype(np.uint8)"
                   if image and x.dtype.kind == "f" else f"send np.asarray(x, dtype=np.{s['dtype']})")
            raise ObservationError(f"observation['{key}'] has dtype {x.dtype}, expected {s['dtype']} ({fix})")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise ObservationError(f"observation['{key}'] contains NaN or inf")
        if batched:
            if batch is not None and x.shape[0] != batch:
                raise ObservationError(f"observation['{key}'] has batch size {x.shape[0]}, other keys {batch}")
            batch = x.shape[0]
        out[key] = x if batched else x[None]
    return out


def _describe(spec: dict) -> str:
    return ", ".join(f"'{k}': {s['dtype']} {tuple(s['shape'])}" for k, s in spec.items())


class Bundle:
    """A loaded, verified bundle: `infer(obs, noise) -> (B, chunk_length, A)` float32 actions."""

    def __init__(self, path: Path, metadata: dict, threads: int | None = None):
        self.path, self.metadata = path, metadata
        self.observation: dict = metadata["observation"]
        self.noise_shape: tuple[int, ...] | None = tuple(metadata["noise"]["shape"]) if metadata["noise"] else None
        self.prompt: dict | None = metadata.get("prompt")  # a VLA bundle: {"default": text, "known": {text: embedding}}
        self._text = None
        graph = metadata["graph"]
        file = path / graph["file"]
        if graph["format"] == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = threads or 1
            self._session = ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"])
            self._run = lambda inputs: self._session.run(["actions"], inputs)[0]
        else:
            # TorchScript runs on torch's pool, one per process: set where asked (serve), not for a bundle loaded
            # beside training (a teacher) or an evaluation, whose threads are the run's
            if threads is not None:
                torch.set_num_threads(threads)
            with warnings.catch_warnings():  # TorchScript is deprecated in torch, still what libtorch loads
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(file), map_location="cpu")
            names = graph["inputs"]
            self._run = lambda inputs: module(*(torch.from_numpy(inputs[n]) for n in names)).numpy()
            # TorchScript's profiling executor optimises the graph in its first two calls (40-60 ms, then 10-20, for
            # a small MLP; under 1 ms after): here, not in a server's first requests, past a 20 Hz loop's deadline.
            zeros = {k: np.zeros((1, *s["shape"]), s["dtype"]) for k, s in self.observation.items()}
            for _ in range(2):
                self.infer(zeros, None if self.noise_shape is None else np.zeros((1, *self.noise_shape), np.float32))

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> "Bundle":
        """Read and verify `<path>/metadata.json` and the graph it names. `threads`: the graph's inference threads
        (None: one for ONNX, and a TorchScript graph takes the process's torch threads as they are)."""
        path = Path(path)
        meta_file = path / METADATA
        if not meta_file.is_file():
            inside = run_output(path)
            if inside is not None and is_bundle(str(inside)):
                raise BundleError(f"'{path}' is an export run, not a bundle: give bundle={inside}")
            raise BundleError(f"'{path}' is not a bundle: it has no {METADATA} (make one with `robodistill export ckpt={inside or '...'}`)")
        try:
            metadata = json.loads(meta_file.read_text())
        except json.JSONDecodeError as err:
            raise BundleError(f"{meta_file} is not valid JSON ({err}); re-export the bundle") from err
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
            raise BundleError(f"{meta_file} is not a {FORMAT} bundle; re-export it with this robodistill")
        if metadata.get("checksum") != metadata_checksum(metadata):
            raise BundleError(f"{meta_file} was modified after export (its checksum does not match); re-export the bundle")
        missing = [k for k in ("graph", "observation", "noise", "action", "env", "files") if k not in metadata]
        if missing:
            raise BundleError(f"{meta_file} lacks {', '.join(missing)}; re-export the bundle")
        # The checksum catches corruption, not an edit that recomputes it: the graph must still be hashed and inside.
        graph, files = metadata["graph"], metadata["files"]
        graph_file = graph.get("file") if isinstance(graph, dict) else None
        if not isinstance(files, dict) or graph_file not in files or Path(graph_file).name != graph_file:
            raise BundleError(f"{meta_file} lacks a hashed graph file inside the bundle; re-export the bundle")
        for name, digest in metadata["files"].items():
            if not (path / name).is_file():
                raise BundleError(f"bundle '{path}' is missing {name}; re-export it")
            if sha256(path / name) != digest:
                raise BundleError(f"bundle '{path}': {name} does not match the sha256 in {METADATA} (tampered or corrupted); re-export it")
        return cls(path, metadata, threads)

    def instruct(self, obs: dict, batched: bool) -> dict:
        """A VLA bundle's observation with `prompt` (text; default: the exported task's) turned into
        its `instruction` embedding; other bundles' observations unchanged."""
        if self.prompt is None or not isinstance(obs, dict):
            return obs  # check_observation says what is wrong with a non-dict
        obs = dict(obs)
        prompt = obs.pop("prompt", None)
        if "instruction" in obs:
            if prompt is not None:
                raise ObservationError("the observation has both 'prompt' (text) and 'instruction' (its embedding): send one")
            return obs
        prompt = self.prompt["default"] if prompt is None else prompt
        if isinstance(prompt, bytes):
            prompt = prompt.decode()
        if not isinstance(prompt, str):
            raise ObservationError(f"observation['prompt'] must be text (the instruction), got {type(prompt).__name__}")
        if not prompt.strip():
            raise ObservationError("observation['prompt'] is empty: send the instruction's text, or no prompt for the exported task's")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ObservationError(f"observation['prompt'] has {len(prompt)} characters; an instruction has at most {MAX_PROMPT_CHARS}")
        known = self.prompt["known"]
        vector = np.asarray(known[prompt], np.float32) if prompt in known else self.text_encoder()([prompt])[0].numpy()
        if batched:
            batch = next(iter(obs.values())).shape[0] if obs else 1
            vector = np.repeat(vector[None], batch, axis=0)
        obs["instruction"] = vector
        return obs

    def text_encoder(self):
        """The sentence encoder for prompts the export did not embed, loaded on the first call: a server
        calls it at start, so no request waits seconds for it."""
        if self._text is None:
            from robodistill.policies.vla.text import TextEncoder

            self._text = TextEncoder().load()
        return self._text

    @property
    def chunk_length(self) -> int:
        return int(self.metadata["action"]["chunk_length"])

    def noise(self, batch: int, rng: np.random.Generator) -> np.ndarray | None:
        """The graph's noise input for `batch` observations (None: a deterministic policy takes none)."""
        if self.noise_shape is None:
            return None
        return rng.standard_normal((batch, *self.noise_shape), dtype=np.float32)

    def infer(self, obs: dict[str, np.ndarray], noise: np.ndarray | None) -> np.ndarray:
        """Batched, already checked observations (`check_observation(..., batched=True)`)."""
        return self._run(obs if noise is None else {**obs, "noise": noise})


class BundlePolicy:
    """A bundle as a `Policy` for evaluation: noise from a generator seeded like the server's, so
    an in-process evaluation and a closed loop through `robodistill serve` see the same draws."""

    def __init__(self, bundle: Bundle, seed: int = 0):
        self.bundle = bundle
        self.obs_horizon = int(bundle.metadata["policy"]["obs_horizon"])
        self.act_horizon = bundle.chunk_length
        self.rng = np.random.default_rng(seed)

    @torch.no_grad()
    def predict_chunk(self, obs: dict[str, torch.Tensor], streams: torch.Tensor | None = None) -> torch.Tensor:
        arrays = {k: v.cpu().numpy() for k, v in obs.items()}
        arrays = check_observation(self.bundle.instruct(arrays, batched=True), self.bundle.observation, batched=True)
        batch = next(iter(arrays.values())).shape[0]
        device = next(iter(obs.values())).device
        return torch.from_numpy(self.bundle.infer(arrays, self.bundle.noise(batch, self.rng))).to(device)


def is_bundle(spec: str) -> bool:
    return Path(spec).is_dir() and (Path(spec) / METADATA).is_file()


def load_bundle_policy(spec: str, env, seed: int = 0) -> BundlePolicy:
    """A bundle directory as a policy for `env`, which must be the env it was exported for."""
    bundle = Bundle.load(spec)
    check_trained_on(f"bundle '{spec}'", bundle.metadata["env"], env)
    return BundlePolicy(bundle, seed)
