"""The echo decoder in trainable form: teacher-forced unit-token logits, with gradients.

The same model as `echo.EchoDecoder` (SPEC §7), laid out for training. For one example with
n slot rows S [n, H] and target unit tokens u_1..u_m, the decoder reads

    adapter( concat( T[P_text], S, T[P_unit], T[u_1 .. u_m] ) )

and the states at the last P_unit position and at each u_i predict u_1, ..., u_m, eot. The slot
rows are what a stage puts there: the text embeddings E_text of the response (stage II, and the
frozen copy that makes stage III's pseudo-labels), or aligner_MLP(h_t) (stage III, and
inference). T's text part E_text is frozen: it is the LLM's embedding table; the unit
embeddings, the aligner, the adapter, the body and the head train.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ..config import EchoDecoderConfig
from ..echo import _aligner_mlp
from ..llama import LlamaBody
from ..weights import embedding_table
from .batching import pad_rows


@dataclass
class UnitLogits:
    logits: torch.Tensor  # [B, M, V+U] at the positions that predict the targets
    targets: torch.Tensor  # [B, M] unit token ids (>= V), then eot
    mask: torch.Tensor  # [B, M] True on real targets


class TrainableEchoDecoder(nn.Module):
    def __init__(self, cfg: EchoDecoderConfig, prefixes: tuple[list[int], list[int]], eot: int,
                 tensors: dict[str, torch.Tensor], checkpointed: bool = False, aligner_dropout: float = 0.0):
        """`tensors` keyed as `echo_layout(cfg, prefix="")`, taken over (trained in place; each caller
        passes tensors of its own, as `Checkpoint.take` reads them);
        `aligner_dropout`: the aligner MLP's dropout while the module is in training mode."""
        super().__init__()
        self.cfg, self.eot, self.checkpointed = cfg, eot, checkpointed
        big_h, width = cfg.llm_hidden_size, cfg.body.hidden_size
        with torch.device("meta"):  # every value comes from `tensors`
            self.aligner_mlp = _aligner_mlp(big_h, cfg.aligner_intermediate, aligner_dropout)
            self.adapter = nn.Linear(big_h, width)
            self.body = LlamaBody(cfg.body)
            self.lm_head = nn.Linear(width, cfg.body.vocab_size, bias=False)
            self.unit_embedding = embedding_table(cfg.unit_vocab_size, big_h)
        own_names = {"aligner_mlp.0": "aligner_MLP.0", "aligner_mlp.3": "aligner_MLP.3", "adapter": "adapter"}
        self.load_state_dict({f"{ours}.{part}": tensors[f"{released}.{part}"]
                              for ours, released in own_names.items() for part in ("weight", "bias")}
                             | {name: tensors[name] for name in ("lm_head.weight", "unit_embedding.weight")},
                             strict=False, assign=True)
        self.body.load_released(tensors, "model.")  # takes them out as their fused copies exist
        self.requires_grad_(True)
        # E_text, frozen
        self.register_buffer("text_embeddings", tensors["model.embed_tokens.weight"], persistent=False)
        device = self.adapter.weight.device
        self.register_buffer("text_prefix", torch.tensor(prefixes[0], device=device), persistent=False)
        self.register_buffer("unit_prefix", torch.tensor(prefixes[1], device=device), persistent=False)

    def table(self, token_ids: torch.Tensor) -> torch.Tensor:
        """T[id] [..., H]: text embeddings below V, unit embeddings from V on."""
        first_unit = self.cfg.text_vocab_size
        text = self.text_embeddings[token_ids.clamp(max=first_unit - 1)]
        units = self.unit_embedding(token_ids.sub(first_unit).clamp(min=0))
        return torch.where((token_ids < first_unit)[..., None], text, units)

    def forward(self, slots: list[torch.Tensor], targets: list[list[int]], ended: list[bool] | None = None) -> UnitLogits:
        """slots: per example [n_b, H]; targets: per example unit token ids, followed here by eot
        unless `ended[b]` is False (units cut at a length limit: nothing ends them)."""
        device = self.adapter.weight.device
        before, after = self.table(self.text_prefix), self.table(self.unit_prefix)
        rows, starts, answers = [], [], []
        for slot, units, ends in zip(slots, targets, ended or [True] * len(targets)):
            answer = torch.tensor(list(units) + [self.eot] * ends, device=device)
            sequence = torch.cat([before, slot.to(before.dtype), after, self.table(answer[:-1])])
            rows.append(sequence)
            starts.append(len(sequence) - len(answer))  # the last P_unit position predicts the first unit
            answers.append(answer)
        x, present = pad_rows(rows)
        hidden = self.body.forward_sequences(self.adapter(x), present, self.checkpointed)  # [B, L, h]
        answer_ids, answer_mask = pad_rows(answers)
        where = torch.tensor(starts, device=device)[:, None] + torch.arange(answer_ids.shape[1], device=device)
        where = where.clamp(max=hidden.shape[1] - 1)  # padded targets are masked
        predicting = hidden.gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))
        return UnitLogits(self.lm_head(predicting), answer_ids, answer_mask)

    def released_tensors(self) -> dict[str, torch.Tensor]:
        """The weights keyed as `echo_layout(cfg, prefix="")`."""
        body = {"model." + k: v for k, v in self.body.released_tensors().items()}
        mlp = self.aligner_mlp
        return body | {
            "aligner_MLP.0.weight": mlp[0].weight, "aligner_MLP.0.bias": mlp[0].bias,
            "aligner_MLP.3.weight": mlp[3].weight, "aligner_MLP.3.bias": mlp[3].bias,
            "model.embed_tokens.weight": self.text_embeddings, "unit_embedding.weight": self.unit_embedding.weight,
            "adapter.weight": self.adapter.weight, "adapter.bias": self.adapter.bias, "lm_head.weight": self.lm_head.weight,
        }


def unit_hits(out: UnitLogits) -> tuple[int, int]:
    """Teacher-forced accuracy's counts: (target tokens that are the argmax, target tokens), units and
    the final eot alike; kept as counts so that batches and processes add up."""
    hits = (out.logits.argmax(-1) == out.targets) & out.mask
    return hits.sum().item(), out.mask.sum().item()
