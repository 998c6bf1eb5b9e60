"""Float64 oracle of fastmem.linear_cross_entropy, written independently of the package.

It builds the full logits (fine at test sizes), computes the MemFT weights over the whole
batch at once (no chunking, no running state) and the loss with the weights detached, so
autograd gives the reference gradients.
"""

from __future__ import annotations

import math

import torch


def oracle_loss(hidden, weight, labels, bias=None, *, objective="sft", threshold=math.log(2), eps=0.01,
                token_weights=None, sw_kappa=10.0, sw_tau=20.0, sw_window=50, sw_floor=0.01, window=None,
                ignore_index=-100,
                reduction="mean", first_error=None, softcap=None, label_smoothing=0.0, lse_square_scale=0.0):
    """Return (loss, per-token dict, first_error) in float64; loss carries autograd.

    `first_error` overrides the anchors (used where low-precision rounding can flip a near tie).
    Options by LossSpec's names; `window` is the per-sample window tensor (default sw_window).
    """
    seq_len = labels.shape[-1] if labels.dim() else 1
    h = hidden.reshape(-1, hidden.shape[-1])
    logits = h @ weight.t()
    if bias is not None:
        logits = logits + bias
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    flat = labels.reshape(-1)
    valid = flat != ignore_index
    safe = torch.where(valid, flat, torch.zeros_like(flat))
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, safe[:, None]).squeeze(1)
    nll_tok = torch.where(valid, lse - target, torch.zeros_like(lse))
    # F.cross_entropy's label smoothing: (1 - e) nll + e * mean_c(-log p_c); z-loss: + s lse^2
    objective_tok = lse - target
    if label_smoothing:
        objective_tok = (1 - label_smoothing) * objective_tok + label_smoothing * (lse - logits.mean(dim=-1))
    if lse_square_scale:
        objective_tok = objective_tok + lse_square_scale * lse ** 2
    loss_tok = torch.where(valid, objective_tok, torch.zeros_like(lse))
    others = logits.detach().clone()
    others.scatter_(1, safe[:, None], float("-inf"))
    correct = (target.detach() > others.max(dim=1).values) & valid

    num_samples = flat.numel() // max(seq_len, 1) if flat.numel() else 0
    position = torch.arange(flat.numel()) % max(seq_len, 1)
    sample = torch.arange(flat.numel()) // max(seq_len, 1)
    if first_error is None:
        first_error = torch.full((num_samples,), -1, dtype=torch.int64)
        for s in range(num_samples):
            wrong = ((sample == s) & valid & ~correct).nonzero().squeeze(1)
            if wrong.numel():
                first_error[s] = position[wrong[0]]
    first_error = first_error.reshape(-1)

    L = nll_tok.detach()
    if objective == "sft":
        w = torch.ones_like(L)
    elif objective == "ot":
        w = (L > threshold).double()
    else:
        w = torch.sigmoid(sw_kappa * (L - threshold))
        win = window if window is not None else torch.full((max(num_samples, 1),), float(sw_window))
        for i in range(flat.numel()):
            a = int(first_error[sample[i]])
            if a < 0:
                continue
            d = int(position[i]) - a
            w[i] = w[i] * (math.exp(-max(d, 0) / sw_tau) if d < float(win.reshape(-1)[sample[i]]) else sw_floor)
    if token_weights is not None:
        w = w * token_weights.reshape(-1).double()
    w = torch.where(valid, w, torch.zeros_like(w))
    weighted = objective != "sft" or token_weights is not None
    if reduction == "none":
        loss = (w * loss_tok).reshape(labels.shape)
    elif reduction == "sum":
        loss = (w * loss_tok).sum()
    elif weighted:
        loss = (w * loss_tok).sum() / (w.sum() + eps)
    else:
        loss = loss_tok.sum() / max(int(valid.sum()), 1)
    probs = torch.softmax(logits.detach(), dim=-1)
    entropy = lse.detach() - (probs * logits.detach()).nan_to_num(0.0, 0.0, 0.0).sum(-1)
    per_token = dict(loss=L, prob=torch.where(valid, torch.exp(-L), torch.zeros_like(L)), correct=correct,
                     lse=torch.where(valid, lse.detach(), torch.zeros_like(L)), weight=w, valid=valid,
                     entropy=torch.where(valid, entropy, torch.zeros_like(L)))
    return loss, per_token, first_error
