"""The loss terms of echo training (SPEC §9), as plain functions of tensors.

    L_S2T  = CE(response tokens) + 0.3 * CTC(adapter CTC head vs transcript, blank = <audio_patch>)
    L_echo = CE(echo decoder's unit tokens vs the pseudo-labels)
    L_den  = mean over the batch of the sum over text slots of (1 - cos(aligner_MLP(h_t), E_text))
    lambda = 0.2 * L_echo / L_den  if L_den > 0.2 * L_echo  else 1      (a value: no gradient)
    L_T2U  = L_echo + lambda * L_den
    total  = 0.2 * L_S2T + 2 * L_T2U  if L_S2T < 1  else  L_S2T + L_T2U

Every mean over a batch weighs each example the same (a cross entropy is first averaged over
that example's targets; torch's CTC "mean" divides by the target length the same way). So a
batch split over several processes, whose gradients DDP averages, trains exactly as one
process on the whole batch would, given the same lambda and branch (`loop.global_mean` makes
those from the whole batch's values).
"""

import torch
import torch.nn.functional as F

CTC_WEIGHT = 0.3


def sequence_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], targets [B, T], mask [B, T] bool (which targets count) -> scalar: the mean
    over examples of each example's mean cross entropy."""
    per_token = F.cross_entropy(logits.transpose(1, 2), targets.masked_fill(~mask, 0), reduction="none")  # [B, T]
    weight = mask.to(per_token.dtype)
    return ((per_token * weight).sum(1) / weight.sum(1)).mean()


def ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor, blank: int) -> torch.Tensor:
    """log_probs [T, B, V] (log-softmax over V; all T frames are input), targets [B, S] padded,
    target_lengths [B] -> scalar: the mean over examples of the CTC loss divided by the target length."""
    frames, batch = log_probs.shape[:2]
    input_lengths = torch.full((batch,), frames, dtype=torch.long)
    return F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=blank, reduction="mean",
                      zero_infinity=True)


def speech_to_text_loss(cross_entropy: torch.Tensor, ctc: torch.Tensor) -> torch.Tensor:
    return cross_entropy + CTC_WEIGHT * ctc


def denoising_loss(denoised: torch.Tensor, text_embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """denoised = aligner_MLP(h_t) [B, n, H], text_embeddings E_text [B, n, H], mask [B, n] bool
    (the real text slots) -> scalar: mean over examples of the sum over slots of 1 - cos."""
    distance = 1 - F.cosine_similarity(denoised, text_embeddings, dim=-1)  # [B, n]
    return (distance * mask.to(distance.dtype)).sum(1).mean()


def echo_lambda(echo: torch.Tensor, denoising: torch.Tensor) -> torch.Tensor:
    """The dynamic weight of L_den: keeps it at most a fifth of L_echo. A value, not a function:
    no gradient flows through it."""
    echo, denoising = echo.detach(), denoising.detach()
    return torch.where(denoising > 0.2 * echo, 0.2 * echo / denoising, torch.ones_like(echo))


def text_to_unit_loss(echo: torch.Tensor, denoising: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """L_T2U = L_echo + lambda * L_den, lambda from `echo_lambda`."""
    return echo + weight * denoising


def total_loss(speech_to_text: torch.Tensor, text_to_unit: torch.Tensor, branch_value: torch.Tensor | None = None):
    """Stage III's total. Once the LLM answers well (L_S2T < 1) the speech path weighs ten times
    more. `branch_value` (default L_S2T itself) decides the branch: under DDP, the whole batch's L_S2T."""
    decider = speech_to_text.detach() if branch_value is None else branch_value
    if decider < 1:
        return 0.2 * speech_to_text + 2 * text_to_unit
    return speech_to_text + text_to_unit
