"""An independent, plain re-statement of SAINT from docs/method.md (numpy, float64).

Shares no code with saint_export. It runs a timm VisionTransformer's forward by hand, with the
released method's batch-shared dynamic r in blocks 0 … ⌊D/2⌋−1, and reports each block's kept
token indices. Scores are rounded to float32 at the end (docs/method.md: scores are fp32).
"""
import numpy as np
import torch
import torch.nn.functional as F


def saint_drop_reference(keys, num_protected, tau=0.75, K=5, gamma=10.0, drop=None):
    """keys [B, N, d] (numpy) → (r, keep [B, N − r] or None when r == 0). §2.4–2.8, line by line.
    `drop`: a static r instead of the batch-mean rule."""
    m = keys[:, num_protected:].astype(np.float64)
    m = m / np.linalg.norm(m, axis=-1, keepdims=True)
    a, b = m[:, 0::2], m[:, 1::2]
    sim = a @ b.transpose(0, 2, 1)
    tau32, gamma32 = float(np.float32(tau)), float(np.float32(gamma))
    v = sim >= tau32
    c = v.sum(-1)
    r = int(np.mean((c >= K).sum(-1))) if drop is None else drop  # one r for the batch, truncated
    if r <= 0:
        return 0, None
    sbar = (sim * v).sum(-1) / np.maximum(c, 1)
    score = np.where(c > 0, c * np.exp(gamma32 * (sbar - tau32)), sim.mean(-1)).astype(np.float32)
    order = np.argsort(-score, axis=-1, kind="stable")  # descending, lower index first on ties
    kept_a = order[:, r:]
    n = keys.shape[1] - num_protected
    batch = keys.shape[0]
    protected = np.tile(np.arange(num_protected), (batch, 1))
    a_tokens = num_protected + 2 * kept_a
    b_tokens = np.tile(num_protected + 1 + 2 * np.arange(n // 2), (batch, 1))
    return r, np.concatenate([protected, a_tokens, b_tokens], axis=1)


def degree_drop_reference(keys, num_protected, keep_num, r0=16):
    """The released VLM code's `iterative_drop_full_graph` (docs/vlm.md), each image on its own:
    keys [B, N, d] (numpy) → keep [B, num_protected + keep_num], survivors ascending. Its loop
    line by line (the step reuses r as the divisor, from r0 for each image); degrees are fp32 similarities summed in
    float64, ties dropping the lower index first."""
    keeps = []
    for image in keys:
        m = image[num_protected:].astype(np.float64)
        m = m / np.linalg.norm(m, axis=-1, keepdims=True)
        alive, r = np.arange(len(m)), r0
        while len(alive) > keep_num:
            r = min(len(alive) - keep_num, len(alive) // r)
            sim = (m[alive] @ m[alive].T).astype(np.float32).astype(np.float64)
            degree = sim.sum(-1).astype(np.float32)
            drop = np.argsort(-degree, kind="stable")[:r]
            alive = np.delete(alive, drop)
        keeps.append(np.concatenate([np.arange(num_protected), num_protected + alive]))
    return np.stack(keeps)


@torch.no_grad()
def reference_forward(model, x, tau=0.75, K=5, gamma=10.0):
    """A timm VisionTransformer forward with dynamic SAINT. Returns (logits, [(block, keep or None)])."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    p = model.num_prefix_tokens
    kept = []
    for index, blk in enumerate(model.blocks):
        attn = blk.attn
        h = blk.norm1(x)
        B, N, _ = h.shape
        q, k, v = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        metric = k.mean(1)
        q, k = attn.q_norm(q), attn.k_norm(k)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
        x = x + blk.ls1(attn.proj(attn.norm(o)))
        if index < len(model.blocks) // 2:
            r, keep = saint_drop_reference(metric.numpy(), p, tau, K, gamma)
            kept.append((index, keep))
            if keep is not None:
                idx = torch.from_numpy(keep)
                x = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.forward_head(model.norm(x)), kept
