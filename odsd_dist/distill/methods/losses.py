"""The loss terms of METHODS.md, as pure functions on tensors (checked by hand in tests/test_losses.py)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import weighted_mean


def kd_loss(z_s: torch.Tensor, z_t: torch.Tensor, tau: float, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Hinton KD: KL(softmax(z_t/tau) || softmax(z_s/tau)) * tau^2, summed over classes, (weighted) batch mean."""
    log_q = F.log_softmax(z_t.float() / tau, dim=1)
    log_p = F.log_softmax(z_s.float() / tau, dim=1)
    kl = (log_q.exp() * (log_q - log_p)).sum(1)
    return weighted_mean(kl, weight) * tau * tau


def sparse_kd_loss(z_s: torch.Tensor, idx: torch.Tensor, prob: torch.Tensor, tau: float,
                   weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Low-noise KD (METHODS.md §1.3-1.4): KL(q || softmax(z_s/tau)) * tau^2 with q sparse on `idx`.

    q is renormalised over its k' entries; entries with probability 0 (padding) contribute nothing.
    """
    prob = prob.float()
    q = prob / prob.sum(1, keepdim=True).clamp_min(1e-12)
    log_p = F.log_softmax(z_s.float() / tau, dim=1).gather(1, idx.long())
    log_q = torch.where(q > 0, q.clamp_min(1e-30).log(), torch.zeros_like(q))
    kl = (q * (log_q - log_p)).sum(1)
    return weighted_mean(kl, weight) * tau * tau


def low_noise_targets(z_t: torch.Tensor, k: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Online §1.3 targets: the top-k' classes of z_t with softmax(z_t/tau) renormalised over them."""
    k = min(k, z_t.shape[1])
    top, idx = z_t.float().topk(k, dim=1)
    return idx, torch.softmax(top / tau, dim=1)


def nt_xent(h1: torch.Tensor, h2: torch.Tensor, temp: float) -> torch.Tensor:
    """NT-Xent / InfoNCE over 2B views: positive = the other view of the same image, negatives = the other 2B-2."""
    b = h1.shape[0]
    h = F.normalize(torch.cat([h1, h2]).float(), dim=1)
    sim = h @ h.t() / temp
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=h.device), float("-inf"))
    pos = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(h.device)
    return F.cross_entropy(sim, pos)


def relation_weights(z_t: torch.Tensor, threshold: float) -> torch.Tensor:
    """Denoising row weights: min(1, maxprob_T / threshold) (1 everywhere when threshold is 0)."""
    if threshold <= 0:
        return torch.ones(z_t.shape[0], device=z_t.device)
    maxprob = torch.softmax(z_t.float(), dim=1).max(1).values
    return (maxprob / threshold).clamp(max=1.0)


def relation_loss(f_s: torch.Tensor, f_t: torch.Tensor, temp: float,
                  row_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Relational KD: row-wise KL(softmax(A_T/temp) || softmax(A_S/temp)) over B x B cosine similarities.

    The diagonal (an image with itself, always 1) is left out of each row's softmax.
    """
    b = f_s.shape[0]
    a_s = F.normalize(f_s.float(), dim=1) @ F.normalize(f_s.float(), dim=1).t()
    a_t = F.normalize(f_t.float(), dim=1) @ F.normalize(f_t.float(), dim=1).t()
    off = ~torch.eye(b, dtype=torch.bool, device=f_s.device)
    a_s = a_s[off].view(b, b - 1) / temp
    a_t = a_t[off].view(b, b - 1) / temp
    log_q = F.log_softmax(a_t, dim=1)
    log_p = F.log_softmax(a_s, dim=1)
    kl = (log_q.exp() * (log_q - log_p)).sum(1)
    return weighted_mean(kl, row_weight)
