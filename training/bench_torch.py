"""The same decoder and train step in plain PyTorch (eager, CPU), as the benchmark's baseline.

Architecture as model/layers.py: pre-norm blocks, RMSNorm, RoPE (rotate-half), grouped-query
attention (scaled_dot_product_attention, causal), SwiGLU MLP, final norm, LM head (tied or
not); AdamW with the same hyperparameters and global-norm clipping; mean next-token
cross-entropy. torch is an optional dependency (the `bench` extra).
"""

from __future__ import annotations

import time

from model.config import ModelConfig


def _modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, dim, eps):
            super().__init__()
            self.eps, self.scale = eps, nn.Parameter(torch.ones(dim))

        def forward(self, x):
            x32 = x.float()
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
            return (normed * self.scale).to(x.dtype)

    class Block(nn.Module):
        def __init__(self, c: ModelConfig):
            super().__init__()
            d, h = c.d_model, c.head_dim
            self.c = c
            self.attn_norm, self.mlp_norm = RMSNorm(d, c.norm_eps), RMSNorm(d, c.norm_eps)
            self.q = nn.Linear(d, c.num_heads * h, bias=c.qkv_bias)
            self.k = nn.Linear(d, c.num_kv_heads * h, bias=c.qkv_bias)
            self.v = nn.Linear(d, c.num_kv_heads * h, bias=c.qkv_bias)
            self.o = nn.Linear(c.num_heads * h, d, bias=False)
            self.gate = nn.Linear(d, c.ffn_dim, bias=False)
            self.up = nn.Linear(d, c.ffn_dim, bias=False)
            self.down = nn.Linear(c.ffn_dim, d, bias=False)

        def forward(self, x, cos, sin):
            c = self.c
            b, t, _ = x.shape
            h = self.attn_norm(x)
            q = self.q(h).view(b, t, c.num_heads, c.head_dim).transpose(1, 2)
            k = self.k(h).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
            v = self.v(h).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               enable_gqa=c.num_kv_heads != c.num_heads)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
            h = self.mlp_norm(x)
            return x + self.down(F.silu(self.gate(h)) * self.up(h))

    def rope(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Decoder(nn.Module):
        def __init__(self, c: ModelConfig):
            super().__init__()
            self.c = c
            self.embedding = nn.Embedding(c.vocab_size, c.d_model)
            self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
            self.final_norm = RMSNorm(c.d_model, c.norm_eps)
            self.lm_head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size,
                                                                   bias=False)

        def forward(self, tokens):
            c = self.c
            t = tokens.shape[1]
            inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float()
                                               / c.head_dim))
            angles = torch.arange(t).float()[:, None] * inv_freq[None]
            cos, sin = angles.cos(), angles.sin()
            x = self.embedding(tokens)
            for block in self.blocks:
                x = block(x, cos, sin)
            x = self.final_norm(x)
            head = self.embedding.weight if self.lm_head is None else self.lm_head.weight
            return x @ head.T

    return Decoder


def bench_torch(config: ModelConfig, batch_size: int, seq_len: int, steps: int, warmup: int = 2,
                learning_rate: float = 3e-3, weight_decay: float = 0.1, clip_norm: float = 1.0,
                threads: int | None = None) -> dict:
    """Time `steps` AdamW train steps of the torch decoder on random tokens (float32, CPU)."""
    import os

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads or os.cpu_count())
    torch.manual_seed(0)
    model = _modules()(config)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate,
                            betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=gen)

    def step():
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, config.vocab_size).float(),
                               tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        opt.step()
        return float(loss.detach())

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    elapsed = time.perf_counter() - t0
    return {"framework": f"torch {torch.__version__} (eager, {torch.get_num_threads()} threads)",
            "step_time_s": elapsed / steps,
            "tokens_per_s": steps * batch_size * seq_len / elapsed, "final_loss": loss}
