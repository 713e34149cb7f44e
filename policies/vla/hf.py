"""VLA checkpoints kept on local disk in Hugging Face format, run through transformers, OpenVLA's way.

A directory that `transformers.AutoProcessor` and `AutoModelForImageTextToText` open (config.json,
weights, processor files; nothing is fetched: `local_files_only`) is a `Policy`:
- the newest camera frame and the prompt `In: What action should the robot take to <instruction>?\\nOut:`
  (the env task's instruction, or `prompt` in the observation) go through the model's processor;
- greedy decoding of `action_dim` new tokens; as in OpenVLA, the last `n_action_bins` ids of the
  text vocabulary are the action bins: token id v is bin `vocab_size - v - 1`, whose centre on
  [-1, 1] (256 edges, 255 centres) is the normalised action;
- unnormalised with the dataset's 1st/99th percentiles (`norm_stats[<unnorm_key>]["action"]`
  `q01`/`q99`/`mask` in config.json, OpenVLA's layout), then clipped to the env's action bounds.
One action per observation (obs_horizon = act_horizon = 1), as the RPD authors use OpenVLA.
The model runs on the env's device (the GPU with env.sim_backend=physx_cuda), as every loaded policy does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from robodistill.errors import UserError

PROMPT = "In: What action should the robot take to {instruction}?\nOut:"


def is_hf_model(spec: str) -> bool:
    return Path(spec).is_dir() and (Path(spec) / "config.json").is_file()


class HFVLAPolicy:
    obs_horizon = 1
    act_horizon = 1

    def __init__(self, path: str, action_low: torch.Tensor, action_high: torch.Tensor, instruction: str | None,
                 unnorm_key: str | None = None, n_action_bins: int = 256, device: torch.device | str = "cpu"):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval().to(device)
        except (OSError, ValueError) as err:
            raise UserError(f"{path} is not a vision-language model transformers can open offline "
                            f"(config.json, weights and processor files): {str(err)[:300]}") from err
        self.instruction = instruction
        self.action_low, self.action_high = action_low.float().cpu(), action_high.float().cpu()
        self.action_dim = len(action_low)
        config = self.model.config
        self.vocab_size = getattr(config, "text_config", config).vocab_size - getattr(config, "pad_to_multiple_of", 0)
        edges = np.linspace(-1, 1, n_action_bins)
        self.bin_centers = torch.from_numpy((edges[:-1] + edges[1:]) / 2).float()
        stats = getattr(config, "norm_stats", None) or {}
        if stats:
            key = unnorm_key or next(iter(stats))
            if key not in stats:
                raise UserError(f"unnorm_key={key} is not in {path}'s norm_stats ({', '.join(stats)})")
            a = stats[key]["action"]
            self.q01, self.q99 = torch.tensor(a["q01"]).float(), torch.tensor(a["q99"]).float()
            self.mask = torch.tensor(a.get("mask", [True] * len(a["q01"])))
            if len(self.q01) != self.action_dim:
                raise UserError(f"{path}'s norm_stats[{key}] has {len(self.q01)} action dims, the env {self.action_dim}")
        else:  # no statistics: the model's actions are already in env units on [-1, 1]
            self.q01, self.q99 = -torch.ones(self.action_dim), torch.ones(self.action_dim)
            self.mask = torch.ones(self.action_dim, dtype=torch.bool)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, action_dim) generated token ids -> (B, action_dim) actions in env units."""
        bins = (self.vocab_size - tokens - 1).clamp(0, len(self.bin_centers) - 1)
        normalized = self.bin_centers[bins]
        actions = torch.where(self.mask, 0.5 * (normalized + 1) * (self.q99 - self.q01) + self.q01, normalized)
        return torch.clamp(actions, self.action_low, self.action_high)

    @torch.no_grad()
    def predict_chunk(self, obs: dict, streams: torch.Tensor | None = None) -> torch.Tensor:
        instruction = obs.get("prompt", self.instruction)
        if instruction is None:
            raise UserError("this VLA needs an instruction: the env's task has none in robodistill.policies.vla.instructions; "
                            "send `prompt` with the observation")
        frames = obs["rgb"][:, -1].cpu().numpy()  # (B, H, W, C) uint8, the newest frame
        # Llava-style processors mark where the image goes; OpenVLA's (Prismatic) puts it first itself.
        image_token = getattr(self.processor, "image_token", None)
        text = (f"{image_token}\n" if image_token else "") + PROMPT.format(instruction=instruction.lower().rstrip("."))
        texts = [text] * len(frames)
        inputs = self.processor(text=texts, images=list(frames), return_tensors="pt").to(self.model.device)
        generated = self.model.generate(**inputs, max_new_tokens=self.action_dim, do_sample=False)
        actions = self.decode(generated[:, -self.action_dim:].cpu())
        return actions[:, None].to(obs["rgb"].device)


def load_hf_vla(path: str, env) -> HFVLAPolicy:
    from robodistill.policies.vla.instructions import INSTRUCTIONS

    if env.cfg.obs_mode != "rgb":
        raise UserError(f"{path} is a vision-language-action model: it needs camera images (env.obs_mode=rgb)")
    return HFVLAPolicy(path, env.action_low, env.action_high, INSTRUCTIONS.get(env.cfg.task, [None])[0], device=env.device)
