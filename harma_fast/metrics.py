"""Retrieval evaluation by the standard protocol (DESIGN §2), without sorting.

The rank of a ground truth is the number of candidates scoring *strictly* above it, so a
candidate tied with the ground truth does not push it down (ties favour the ground truth; an
argsort with the ground truth placed first among equal scores gives the same ranks). Features
that cannot rank anything (all rows the same vector, or zero rows) are refused rather than
scored a perfect 100.

- text→image: caption ``t`` is a hit at K when its image ranks < K among all images;
- image→text: image ``i`` is a hit at K when *any* of its captions ranks < K among all captions,
  i.e. when fewer than K captions of other images score above its best-scoring caption.

``mR`` is the mean of the six recalls. Scores are dot products of the given features (pass
L2-normalised features for cosine similarity), computed in float32 at least (float64 features
in float64).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from .backend import use_triton
from .errors import ConfigError

Tensor = torch.Tensor
KS = (1, 5, 10)


def _check(image: Tensor, text: Tensor, text_to_image) -> Tensor:
    if image.ndim != 2 or text.ndim != 2 or image.shape[1] != text.shape[1]:
        raise ConfigError(f"retrieval_metrics expects (N_images, D) and (N_texts, D) features; got "
                          f"{tuple(image.shape)} and {tuple(text.shape)}")
    if image.shape[0] == 0 or text.shape[0] == 0:
        raise ConfigError(f"retrieval_metrics needs a non-empty gallery; got {image.shape[0]} images and "
                          f"{text.shape[0]} captions (is the evaluation split empty?)")
    text_to_image = torch.as_tensor(text_to_image, device=text.device)
    if text_to_image.dtype == torch.bool or text_to_image.is_complex():
        raise ConfigError(f"text_to_image must hold integer image indices, got dtype {text_to_image.dtype}")
    if text_to_image.is_floating_point():
        fractional = text_to_image != text_to_image.round()
        if fractional.any():
            where = fractional.nonzero().flatten()[:5].tolist()
            raise ConfigError(f"text_to_image must hold integer image indices; captions {where} have "
                              f"non-integer values {text_to_image[where].tolist()}")
    text_to_image = text_to_image.long()
    if text_to_image.shape != (text.shape[0],):
        raise ConfigError(f"text_to_image must give one image index per caption: shape ({text.shape[0]},), "
                          f"got {tuple(text_to_image.shape)}")
    if text_to_image.min() < 0 or text_to_image.max() >= image.shape[0]:
        raise ConfigError(f"text_to_image has indices outside [0, {image.shape[0]})")
    owned = torch.zeros(image.shape[0], dtype=torch.bool, device=text.device)
    owned[text_to_image] = True
    if not owned.all():
        missing = (~owned).nonzero().flatten()[:5].tolist()
        raise ConfigError(f"images {missing} have no caption; every image needs at least one for image→text recall")
    for name, t in (("image_features", image), ("text_features", text)):
        if not torch.isfinite(t).all():
            rows = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero().flatten()[:5].tolist()
            raise ConfigError(f"retrieval_metrics: {name} has NaN/Inf values (rows {rows}); the encoder "
                              "diverged or was fed bad data")
        # ties favour the ground truth (a duplicate of it must not count): features that cannot
        # tell inputs apart would score every query a hit, so a broken encoder would read R@1 = 100
        zero = (t == 0).all(1)
        if zero.any():
            rows = zero.nonzero().flatten()[:5].tolist()
            raise ConfigError(f"retrieval_metrics: {name} rows {rows} are all zeros; the encoder outputs nothing "
                              "for them (a zeroed projection, or a checkpoint of another model?)")
        if t.shape[0] > 1 and (t == t[:1]).all():
            raise ConfigError(f"retrieval_metrics: all {t.shape[0]} {name} are the same vector; the encoder does "
                              "not tell its inputs apart (a broken or wrong checkpoint?), and every query would "
                              "score a hit")
    return text_to_image


def count_above_ref(queries: Tensor, gallery: Tensor, query_label: Tensor, gallery_owner: Tensor,
                    chunk: int = 1024) -> Tensor:
    """For each query: #gallery items of another owner scoring strictly above its ground truth.

    The ground truth's score is the best score among the query's own items (owner == label),
    taken from the same score matrix as the candidates': a duplicate of the ground truth (the
    same caption under two images, say) then ties with it exactly and does not count, where a
    score summed in another order would beat it or not by rounding.
    """
    counts = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
    if gallery.shape[0] == 0:
        return counts  # nothing can score above anything
    dtype = torch.promote_types(torch.promote_types(queries.dtype, gallery.dtype), torch.float32)
    g = gallery.to(dtype)
    for start in range(0, queries.shape[0], chunk):
        scores = queries[start:start + chunk].to(dtype) @ g.t()
        own = gallery_owner[None, :] == query_label[start:start + chunk, None]
        truth = scores.masked_fill(~own, float("-inf")).amax(1, keepdim=True)
        counts[start:start + chunk] = ((scores > truth) & ~own).sum(1)
    return counts


def retrieval_ranks(image: Tensor, text: Tensor, text_to_image: Tensor, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """``(image→text rank per image, text→image rank per caption)``, 0 = ground truth first."""
    text_to_image = _check(image, text, text_to_image)
    image_index = torch.arange(image.shape[0], device=image.device)
    # the Triton count scores in fp32 (tl.dot has no fp64): float64 features are counted by the
    # reference, in float64, rather than rounded
    wide = torch.float64 in (image.dtype, text.dtype)
    if use_triton(backend, image, text) and not wide:
        from .kernels.retrieval_ranks import count_above
    else:
        count_above = count_above_ref
    i2t = count_above(image, text, image_index, text_to_image)  # an image's truth: its best caption
    t2i = count_above(text, image, text_to_image, image_index)
    return i2t, t2i


def recalls_from_ranks(i2t: Tensor, t2i: Tensor) -> Dict[str, float]:
    """Recall@K in percent, from integer hit counts (a float32 mean gives 57.4999988 for 57.5)."""
    out = {}
    for prefix, ranks in (("txt", i2t), ("img", t2i)):
        for k in KS:
            out[f"{prefix}_r{k}"] = 100.0 * int((ranks < k).sum()) / ranks.numel()
    out["r_mean"] = sum(out.values()) / 6
    return out


def retrieval_metrics(image_features: Tensor, text_features: Tensor, text_to_image,
                      backend: str = "auto") -> Dict[str, float]:
    """R@1/5/10 image→text (``txt_r*``) and text→image (``img_r*``) and their mean ``r_mean``, in percent.

    Args:
        image_features: ``(N_images, D)``.
        text_features: ``(N_texts, D)``.
        text_to_image: for every caption, the index of its image (an image may own any number
            of captions, at least one).
        backend: the tiled Triton count on CUDA (``"auto"``), or the chunked PyTorch count.
    """
    with torch.no_grad():
        return recalls_from_ranks(*retrieval_ranks(image_features, text_features, text_to_image, backend))
