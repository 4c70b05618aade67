"""LoRA on the LLM: trainable low-rank updates W + (alpha / r) * B A of chosen projections.

The engine fuses q/k/v into one matrix `wqkv` and gate/up into `w_gate_up`, while LoRA targets
are named as released (q, k, v, o, gate, up, down). A `LoRALinear` therefore wraps one fused
linear layer and adapts only the row blocks of the targets it holds: with targets q and v, the
k rows of `wqkv` stay exactly as loaded. B starts at zero, so training starts from the loaded
model. `weight` is the merged matrix, which is what gets saved: the released layout has no
LoRA tensors.
"""

import math

import torch
from torch import nn

from ..config import LlamaConfig
from ..errors import EchoXError
from ..llama import LlamaLM

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, blocks: list[tuple[str, int]], targets: set[str], rank: int, alpha: float):
        """`blocks`: the (name, rows) blocks of base's output, in order; those named in `targets` are adapted."""
        super().__init__()
        self.base = base.requires_grad_(False)
        self.blocks = blocks
        self.scale = alpha / rank
        inputs = base.in_features
        self.down = nn.ParameterDict()  # A [r, in], small random
        self.up = nn.ParameterDict()  # B [rows, r], zero
        for name, rows in blocks:
            if name in targets:
                self.down[name] = nn.Parameter(torch.randn(rank, inputs, dtype=base.weight.dtype,
                                                           device=base.weight.device) / math.sqrt(inputs))
                self.up[name] = nn.Parameter(torch.zeros(rows, rank, dtype=base.weight.dtype, device=base.weight.device))

    def delta(self) -> torch.Tensor:
        """scale * B A for every block (zeros where not adapted), stacked as the base's rows."""
        pieces = [self.up[name] @ self.down[name] * self.scale if name in self.up
                  else self.base.weight.new_zeros(rows, self.base.in_features) for name, rows in self.blocks]
        return torch.cat(pieces)

    @property
    def weight(self) -> torch.Tensor:
        """The merged weight W + scale * B A (detached): what the released layout stores."""
        return (self.base.weight + self.delta()).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x A^T B^T per block, never the full-size delta: the activations are small, the weights are not.
        pieces = [(x @ self.down[name].T) @ self.up[name].T * self.scale if name in self.up
                  else x.new_zeros(*x.shape[:-1], rows) for name, rows in self.blocks]
        return self.base(x) + torch.cat(pieces, dim=-1)


def parse_targets(text: str) -> set[str]:
    targets = {t.strip() for t in text.split(",") if t.strip()}
    unknown = targets - set(TARGETS)
    if not targets or unknown:
        raise EchoXError(f"LoRA targets must be a comma-separated subset of {', '.join(TARGETS)}, got {text!r}"
                         + (f" ({', '.join(sorted(unknown))} unknown)" if unknown else ""))
    return targets


def check_rank(rank: int, cfg: LlamaConfig):
    """A rank from 1 to the LLM's width: every wrapped matrix has the width as one side, so a higher
    rank adds nothing but time (100000 on a 64-wide model took 34 s a step)."""
    if not 1 <= rank <= cfg.hidden_size:
        raise EchoXError(f"LoRA rank must be from 1 to the LLM's width {cfg.hidden_size}, got {rank}")


def add_lora(lm: LlamaLM, targets: set[str], rank: int, alpha: float) -> list[nn.Parameter]:
    """Freeze the LLM and wrap the targeted projections of every layer; return the new parameters."""
    check_rank(rank, lm.cfg)
    lm.requires_grad_(False)
    cfg = lm.cfg
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    params = []
    for layer in lm.body.layers:
        attention, ffn = layer.attention, layer.ffn
        wrapped = {
            (attention, "wqkv"): [("q", q_rows), ("k", kv_rows), ("v", kv_rows)],
            (attention, "wo"): [("o", cfg.hidden_size)],
            (ffn, "w_gate_up"): [("gate", cfg.intermediate_size), ("up", cfg.intermediate_size)],
            (ffn, "w_down"): [("down", cfg.hidden_size)],
        }
        for (owner, attribute), blocks in wrapped.items():
            if targets & {name for name, _ in blocks}:
                lora = LoRALinear(getattr(owner, attribute), blocks, targets, rank, alpha)
                setattr(owner, attribute, lora)
                params += [*lora.down.values(), *lora.up.values()]
    return params
