"""A 2-D map of teacher features: PCA, then exact t-SNE in torch, for the few thousand points of a report."""
from __future__ import annotations

import numpy as np
import torch


def tsne(x: np.ndarray, perplexity: float = 30.0, iters: int = 400, seed: int = 0, pca_dims: int = 30) -> np.ndarray:
    """t-SNE (van der Maaten & Hinton 2008) after PCA, in torch float32, for a few thousand points.

    Input affinities over each point's 3*perplexity nearest neighbours (as Barnes-Hut t-SNE does), exact
    O(n^2) gradient with in-place arithmetic; deterministic given the seed.
    """
    n = len(x)
    if n < 5:
        return np.zeros((n, 2), np.float32)
    g = torch.Generator().manual_seed(seed)
    X = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    X = X - X.mean(0)
    if X.shape[1] > pca_dims:
        _, _, v = torch.linalg.svd(X, full_matrices=False)
        X = X @ v[:pca_dims].T
    P = _affinities(X, perplexity)
    P_early = P * 12.0  # early exaggeration for the first 100 iterations
    Y = torch.randn(n, 2, generator=g) * 1e-4
    vel = torch.zeros_like(Y)
    gains = torch.ones_like(Y)
    lr = max(n / 12.0 / 4.0, 50.0)
    for it in range(iters):
        sq = (Y * Y).sum(1)
        num = torch.addmm(sq[:, None] + sq[None, :], Y, Y.T, alpha=-2.0)  # |y_i - y_j|^2
        num.clamp_min_(0).add_(1.0).reciprocal_()
        num.fill_diagonal_(0.0)
        z = float(num.sum())
        W = (P_early if it < 100 else P) * num
        W.addcmul_(num, num, value=-1.0 / z)  # (p_ij - q_ij) * num_ij
        grad = 4.0 * (W.sum(1, keepdim=True) * Y - W @ Y)
        mom = 0.5 if it < 250 else 0.8
        gains = torch.where(torch.sign(grad) != torch.sign(vel), gains + 0.2, gains * 0.8).clamp_min(0.01)
        vel = mom * vel - lr * gains * grad
        Y = Y + vel
        Y = Y - Y.mean(0)
    return Y.numpy()


def _affinities(X: torch.Tensor, perplexity: float) -> torch.Tensor:
    """Symmetric input affinities P (n x n, summing to 1): each row's Gaussian over its k = 3*perplexity
    nearest neighbours, its bandwidth found by bisection to match the perplexity."""
    n = len(X)
    perplexity = min(perplexity, (n - 1) / 3)
    k = min(n - 1, int(3 * perplexity) + 1)
    D = torch.cdist(X, X).pow_(2)
    D.fill_diagonal_(float("inf"))
    dk, ik = D.topk(k, dim=1, largest=False)  # squared distances to the k nearest neighbours
    del D
    dk = dk - dk[:, :1]  # shift per row: the same conditional P, no underflow
    target = float(np.log(perplexity))
    lo = torch.full((n, 1), -20.0)
    hi = torch.full((n, 1), 20.0)
    for _ in range(50):  # bisection on log(beta) for every row at once
        lb = (lo + hi) / 2
        Pk = torch.exp(-dk * lb.exp())
        sk = Pk.sum(1, keepdim=True).clamp_min(1e-12)
        H = torch.log(sk) + lb.exp() * (dk * Pk).sum(1, keepdim=True) / sk
        hi = torch.where(H < target, lb, hi)
        lo = torch.where(H < target, lo, lb)
    P = torch.zeros(n, n)
    P.scatter_(1, ik, Pk / sk)
    P = P + P.T
    P /= P.sum()
    return P
