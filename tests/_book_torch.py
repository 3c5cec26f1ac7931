"""The book's PyTorch GPTModel (chapter 4), written from the book for the parity tests of chapters 4-7.

Same module names as the book, so the same state-dict keys (``flaxgpt.io.book.params_to_book`` loads it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["BookLayerNorm", "BookGELU", "BookMultiHeadAttention", "BookTransformerBlock", "BookGPTModel",
           "book_model_from_params", "book_classifier_steps"]


class BookLayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class BookGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


class BookMultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, t, _ = x.shape
        split = lambda y: y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.W_query(x)), split(self.W_key(x)), split(self.W_value(x))
        scores = (q @ k.transpose(2, 3)).masked_fill(self.mask.bool()[:t, :t], -torch.inf)
        weights = self.dropout(torch.softmax(scores / k.shape[-1] ** 0.5, dim=-1))
        return self.out_proj((weights @ v).transpose(1, 2).contiguous().view(b, t, self.d_out))


class BookTransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg["emb_dim"]
        self.att = BookMultiHeadAttention(
            c, c, cfg["context_length"], cfg["drop_rate"], cfg["n_heads"], cfg["qkv_bias"]
        )
        self.ff = nn.Module()
        self.ff.layers = nn.Sequential(nn.Linear(c, 4 * c), BookGELU(), nn.Linear(4 * c, c))
        self.norm1, self.norm2 = BookLayerNorm(c), BookLayerNorm(c)
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff.layers(self.norm2(x)))


class BookGPTModel(nn.Module):
    """The book's chapter-4 GPTModel (same module names, so the same state-dict keys)."""

    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[BookTransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = BookLayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        return self.out_head(self.final_norm(self.trf_blocks(self.drop_emb(x))))


def book_model_from_params(params, cfg):
    """The book's model holding flaxgpt ``params`` of ``cfg`` (a classifier head too: ``cfg.num_classes``)."""
    import numpy as np

    from flaxgpt.io.book import params_to_book

    book_cfg = dict(vocab_size=cfg.vocab_size, context_length=cfg.context_length, emb_dim=cfg.emb_dim,
                    n_heads=cfg.n_heads, n_layers=cfg.n_layers, drop_rate=cfg.drop_rate, qkv_bias=cfg.qkv_bias)
    model = BookGPTModel(book_cfg)
    if cfg.num_classes is None:
        state = params_to_book(params, cfg)
    else:  # the book's chapter 6: model.out_head = torch.nn.Linear(emb_dim, num_classes)
        model.out_head = nn.Linear(cfg.emb_dim, cfg.num_classes)
        lm = {k: v for k, v in params.items() if k != "out_head"}
        lm["out_head"] = {"kernel": np.zeros((cfg.emb_dim, cfg.vocab_size), np.float32)}
        lm_cfg = cfg.replace(num_classes=None)
        state = {k: v for k, v in params_to_book(lm, lm_cfg).items() if not k.startswith("out_head")}
        state["out_head.weight"] = np.asarray(params["out_head"]["kernel"]).T
        state["out_head.bias"] = np.asarray(params["out_head"]["bias"])
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return model


def book_classifier_steps(model, batches, lr: float, weight_decay: float):
    """The book's chapter-6 training steps (``train_classifier_simple``'s inner loop: ``calc_loss_batch`` on the
    last position, ``torch.optim.AdamW`` over ``model.parameters()``), one per batch; the per-step losses.
    The caller chooses what trains (``requires_grad``); the model is left in eval mode."""
    import numpy as np

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    model.train()  # drop_rate is 0: train mode changes nothing but is what the book runs
    for b in batches:
        optimizer.zero_grad()
        logits = model(torch.as_tensor(b["input_ids"]).long())[:, -1, :]  # calc_loss_batch
        loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(b["labels"]).long())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return np.asarray(losses)
