"""HarMA's objective (DESIGN §2): contrastive + adaptive (focal-weighted) triplet loss.

With ``S = I Tᵀ`` (L2-normalised features), ``P_ij = [ids_i = ids_j] / Σ_k [ids_i = ids_k]``:

    L_c = ½ (mean_i CE(S_i·/τ, P_i·) + mean_j CE(S_·j/τ, P_·j))
    c^s_ij  = relu(m + S_ij − S_ii),   c^im_ij = relu(m + S_ij − S_jj)      (i ≠ j)
    f(c)    = (1 − e^{−c})^γ · c                                          (weight not detached)
    L_t     = ½ (Σ_ij f(c^s_ij) + Σ_ij f(c^im_ij))     (max_violation: max over j, resp. i)
    L       = L_c + L_t

``harma_loss_ref`` is the spec (it builds the B×B matrix); the Triton path in
``harma_fast.kernels.similarity_loss`` computes the same function from tiles of ``I Tᵀ``
without ever materialising it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .backend import check_backend, use_triton
from .distributed import gather_batch
from .errors import ConfigError

Tensor = torch.Tensor

# the range τ is kept in, as ALBEF-style code clamps its ``temp`` (HarMA's released code has no clamp:
# there an optimizer step may take τ to zero or below)
TEMPERATURE_RANGE = (0.001, 0.5)


class LossOutput(NamedTuple):
    total: Tensor
    contrastive: Tensor
    triplet: Tensor


def focal_cost(c: Tensor, gamma: float) -> Tensor:
    """``f(c) = (1 − e^{−c})^γ · c`` for ``c >= 0`` (zero where ``c == 0``, finite gradients)."""
    w = (-torch.expm1(-c)).clamp_min(torch.finfo(c.dtype).tiny)
    return w.pow(gamma) * c


def harma_loss_ref(image: Tensor, text: Tensor, temperature: Tensor, image_ids: Optional[Tensor] = None,
                   margin: float = 0.2, gamma: float = 2.0, max_violation: bool = False) -> LossOutput:
    """The objective of DESIGN §2 on one (gathered) batch, computed in at least float32 (also
    under autocast, which would otherwise run ``I Tᵀ`` in its own low-precision dtype)."""
    with torch.autocast(image.device.type, enabled=False):
        return _harma_loss_ref(image, text, temperature, image_ids, margin, gamma, max_violation)


def _harma_loss_ref(image: Tensor, text: Tensor, temperature: Tensor, image_ids: Optional[Tensor],
                    margin: float, gamma: float, max_violation: bool) -> LossOutput:
    dtype = torch.promote_types(image.dtype, torch.float32)
    scores = image.to(dtype) @ text.to(dtype).t()
    b = scores.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=scores.device)
    same = eye if image_ids is None else image_ids[:, None] == image_ids[None, :]
    target = same.to(dtype) / same.sum(1, keepdim=True).to(dtype)
    logits = scores / temperature.to(dtype)
    i2t = -(target * logits.log_softmax(dim=1)).sum(1).mean()
    t2i = -(target * logits.log_softmax(dim=0)).sum(0).mean()
    contrastive = (i2t + t2i) / 2

    diag = scores.diagonal()
    # relu, not clamp(min=0): at an exact tie (c = 0, where f'(0) = 1 for γ = 0) torch 2.11's clamp
    # passes the gradient and 2.14's does not; relu's is 0 in both, as the kernel's (c > 0 is active)
    cost_s = focal_cost(torch.relu(margin + scores - diag[:, None]), gamma).masked_fill(eye, 0)
    cost_im = focal_cost(torch.relu(margin + scores - diag[None, :]), gamma).masked_fill(eye, 0)
    if max_violation:
        triplet = (cost_s.max(dim=1)[0].sum() + cost_im.max(dim=0)[0].sum()) / 2
    else:
        triplet = (cost_s.sum() + cost_im.sum()) / 2
    return LossOutput(contrastive + triplet, contrastive, triplet)


def _as_ids(image_ids, device: torch.device) -> Optional[Tensor]:
    """``image_ids`` as a tensor on ``device``: lists and arrays too, as ``retrieval_metrics`` takes them."""
    if image_ids is None:
        return None
    if isinstance(image_ids, Tensor):
        # ids a loader left on the CPU while the features are on the GPU: the reference path
        # (and NCCL's gather of them) needs them beside the features, as the fused path moves them
        return image_ids.to(device, non_blocking=True)
    try:
        return torch.as_tensor(image_ids, device=device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"image_ids must be a tensor, list or array of image ids (one per pair), got "
                        f"{type(image_ids).__name__}: {e}") from None


def _check_features(image: Tensor, text: Tensor, image_ids: Optional[Tensor], check_finite: bool) -> None:
    if image.ndim != 2 or text.ndim != 2 or image.shape != text.shape:
        raise ValueError(f"HarMALoss expects image and text features of the same shape (B, D); got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")
    if image.shape[0] == 0:
        raise ValueError("HarMALoss got an empty batch")
    if not (image.is_floating_point() and text.is_floating_point()):
        # integer features reached the kernels' dot (a deep interpreter/compiler error) or matmul
        raise TypeError(f"HarMALoss expects floating-point features, got {image.dtype} and {text.dtype}; "
                        "pass the encoders' outputs (float32/bfloat16/float16/float64)")
    if image_ids is not None and (image_ids.ndim != 1 or image_ids.shape[0] != image.shape[0]):
        raise ValueError(f"image_ids must have shape ({image.shape[0]},), got {tuple(image_ids.shape)}")
    if image_ids is not None and (image_ids.dtype == torch.bool or image_ids.is_floating_point()
                                  or image_ids.is_complex()):
        # a mask or float ids compare by value: a bool mask makes two classes of the whole batch,
        # float32 ids past 2**24 merge distinct images; both silently train on wrong positives
        raise TypeError(f"image_ids must be integers (one image id per pair), got dtype {image_ids.dtype}; "
                        "pass image_ids.long() if they are whole numbers")
    if check_finite:
        for name, t in (("image_features", image), ("text_features", text)):
            if not torch.isfinite(t).all():
                bad = (~torch.isfinite(t)).any(1).nonzero().flatten()[:5].tolist()
                raise ValueError(f"HarMALoss: {name} has NaN/Inf values (rows {bad}); the encoder diverged "
                                 "or was fed bad data")


class HarMALoss(nn.Module):
    """Contrastive + adaptive triplet loss with a learnable temperature.

    Args:
        margin: triplet margin ``m``.
        gamma: focal exponent ``γ`` of the triplet weight.
        temperature: initial ``τ``.
        learn_temperature: whether ``τ`` is trained (as in HarMA).
        max_violation: hardest negative per anchor instead of the sum over negatives.
        backend: ``"auto"`` (Triton on CUDA), ``"triton"`` or ``"reference"``.
        temperature_range: ``τ`` is clamped into this range in the forward (as ALBEF-style
            code clamps its ``temp``), which keeps the logits bounded; ``temperature`` must lie
            inside it. Training loops call :meth:`clamp_temperature_` after each optimizer step.
        gather_distributed: under ``torch.distributed``, compute the loss over the batch
            gathered from every rank (DESIGN §2); each rank's gradient is then the gradient of
            the loss on the concatenated batch with respect to its own rows (under DDP, register
            ``harma_fast.distributed.sum_gradients_hook``: DDP's averaging divides it by the world size).
            Every rank must call it, with the same batch size (``drop_last=True``).
        check_finite: raise a clear error on NaN/Inf features (one host synchronisation;
            training loops that check the loss themselves turn it off).

    Call as ``loss(image_features, text_features, image_ids=None)`` with L2-normalised
    features and ``image_ids`` a tensor, list or array of one id per pair; returns
    ``LossOutput(total, contrastive, triplet)``.
    """

    def __init__(self, margin: float = 0.2, gamma: float = 2.0, temperature: float = 0.07,
                 learn_temperature: bool = True, max_violation: bool = False, backend: str = "auto",
                 temperature_range: Tuple[float, float] = TEMPERATURE_RANGE, gather_distributed: bool = True,
                 check_finite: bool = True):
        super().__init__()
        if gamma < 0 or margin < 0 or temperature <= 0:
            raise ConfigError(f"HarMALoss needs margin >= 0, gamma >= 0, temperature > 0; got "
                              f"margin={margin}, gamma={gamma}, temperature={temperature}")
        low, high = temperature_range
        if not 0 < low <= high:
            raise ConfigError(f"HarMALoss: temperature_range must be (low, high) with 0 < low <= high, got "
                              f"{tuple(temperature_range)}")
        # the forward computes with τ clamped into the range: started outside, it would silently
        # compute with a bound while loss.temperature reads the value given
        if not low <= temperature <= high:
            raise ConfigError(f"HarMALoss: temperature {temperature} is outside [{low}, {high}], its "
                              f"temperature_range: the loss would compute with {min(max(temperature, low), high)}; "
                              f"pass a temperature in [{low}, {high}] or widen temperature_range")
        self.margin, self.gamma, self.max_violation = float(margin), float(gamma), bool(max_violation)
        self.backend = check_backend(backend)
        self.temperature_range = tuple(temperature_range)
        self.gather_distributed, self.check_finite = gather_distributed, check_finite
        self.temperature = nn.Parameter(torch.tensor(float(temperature)), requires_grad=learn_temperature)

    def forward(self, image_features: Tensor, text_features: Tensor,
                image_ids: Union[Tensor, Sequence[int], None] = None) -> LossOutput:
        image_ids = _as_ids(image_ids, image_features.device)
        _check_features(image_features, text_features, image_ids, False)
        if self.gather_distributed:
            image_features, text_features, image_ids = gather_batch(image_features, text_features, image_ids)
        if self.check_finite:
            # on the gathered batch: every rank raises, where a rank raising alone left the others
            # waiting in its gather (2 hours, the collective timeout)
            _check_features(image_features, text_features, image_ids, True)
        # clamped in value, not in gradient (torch's clamp passes none at or past a bound, where τ
        # would then stay for good): the gradient ALBEF-style code gets by clamping the parameter
        # in place before using it, which clamp_temperature_ does after each optimizer step
        t = self.temperature
        tau = t + (t.clamp(*self.temperature_range) - t).detach()
        if use_triton(self.backend, image_features, text_features):
            from .kernels.similarity_loss import harma_loss as fused
            return LossOutput(*fused(image_features, text_features, tau, image_ids, self.margin, self.gamma,
                                     self.max_violation))
        return harma_loss_ref(image_features, text_features, tau, image_ids, self.margin, self.gamma,
                              self.max_violation)

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Bring a learned τ an optimizer step moved past ``temperature_range`` back to its bound."""
        self.temperature.clamp_(*self.temperature_range)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, gamma={self.gamma}, max_violation={self.max_violation}, "
                f"backend={self.backend!r}")
