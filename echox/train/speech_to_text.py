"""Stage I's model: a spoken question -> the LLM's answer, teacher-forced, with gradients.

Per example (SPEC §4-§5), exactly as the engine answers at inference:

    Whisper frames [1500, d]  (frozen: computed once per example and cached)
      -> adapter frame features [750, H] -> CTC head logits [750, V]     (the CTC term's input)
      -> shrink to one frame per run of CTC labels -> look-back attention -> speech rows [v, H]
    prompt ids with <audio_patch> replaced by the v rows, then the response tok(answer) + [eot]
      -> LLM (LoRA) over the whole sequence -> final-norm hidden states [T, H] -> lm_head

The response is what the engine's history records for an assistant turn: BOS, the answer's
tokens, eot. Keys are masked where the id is eot, as in the released prompt (SPEC §5 quirk).
The hidden state at position p predicts the token at p + 1, so the states of the response's
tokens are those one position before each: the very pairing of h_t with token t that
inference hands to the echo decoder (eot excluded, since inference never emits it).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import SpeechAdapter, shrink_keep
from ..audio import load_audio
from ..llama import LlamaLM
from ..mel import log_mel
from ..tokenizer import Tokenizer, Turn
from ..whisper import WhisperEncoder
from .batching import pad_rows
from .losses import ctc_loss, sequence_cross_entropy
from .manifest import Example


@dataclass(frozen=True)
class SpeechTurn:
    """One example ready for the model: everything that never changes during training."""

    frames: torch.Tensor  # [1500, d] Whisper output (frozen)
    prompt: tuple[int, ...]  # the chat prompt, one <audio_patch> where the speech rows go
    response: tuple[int, ...]  # tok(response) + [eot]
    transcript: tuple[int, ...]  # the CTC target: tokens of what was said


@torch.no_grad()
def prepare_turns(examples: list[Example], tokenizer: Tokenizer, whisper: WhisperEncoder) -> list[SpeechTurn]:
    device = whisper.conv1.weight.device
    turns = []
    for example in examples:
        mel = log_mel(load_audio(example.audio).to(device), whisper.cfg.num_mel_bins)
        frames = whisper(mel)[0].float().cpu()
        prompt = tokenizer.prompt([Turn("user", audio=True)])
        response = tokenizer.tok(example.response) + [tokenizer.eot]
        turns.append(SpeechTurn(frames, tuple(prompt), tuple(response), tuple(tokenizer.encode(example.transcript))))
    return turns


@dataclass
class SpeechToTextOutput:
    cross_entropy: torch.Tensor | None  # scalar (None without losses)
    ctc: torch.Tensor | None  # scalar (None without losses)
    hidden: torch.Tensor  # [B, n, H] final-norm states that predict the response tokens (eot excluded)
    text_ids: torch.Tensor  # [B, n] those tokens
    text_mask: torch.Tensor  # [B, n] True on real tokens


class SpeechToText(nn.Module):
    def __init__(self, lm: LlamaLM, adapter: SpeechAdapter, tokenizer: Tokenizer, checkpointed: bool = False):
        super().__init__()
        self.lm, self.adapter = lm, adapter
        self.eot, self.audio_patch = tokenizer.eot, tokenizer.audio_patch
        self.checkpointed = checkpointed

    def listen(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whisper frames [1500, d] -> (speech rows [v, H], CTC logits [750, V]), the adapter's own
        modules in the order of `SpeechAdapter.forward`, keeping the logits for the CTC term."""
        adapter = self.adapter
        features = adapter.frame_features(frames)  # [750, H]
        logits = adapter.ctc_head(features)
        query = features[shrink_keep(logits.argmax(dim=-1))]  # [v, H]; which frames is not differentiable
        return adapter.lookback_norm(adapter.lookback(query) + query), logits

    def sequence(self, turn: SpeechTurn, speech: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(rows [T, H], key flags [T], where the response starts) for prompt + speech + response."""
        device = speech.device
        patch = turn.prompt.index(self.audio_patch)
        before, after = list(turn.prompt[:patch]), list(turn.prompt[patch + 1:]) + list(turn.response)
        embed = self.lm.embed_tokens
        ids_before, ids_after = torch.tensor(before, device=device), torch.tensor(after, device=device)
        rows = torch.cat([embed(ids_before), speech.to(embed.weight.dtype), embed(ids_after)])
        valid = torch.cat([ids_before != self.eot, torch.ones(len(speech), dtype=torch.bool, device=device),
                           ids_after != self.eot])
        return rows, valid, len(rows) - len(turn.response)

    def forward(self, turns: list[SpeechTurn], with_losses: bool = True) -> SpeechToTextOutput:
        """`with_losses=False`: only the states and their tokens (held-out scoring), without the CE and
        CTC terms' [B, R, V] and [B, 750, V] logits, which at a real vocabulary dwarf everything else."""
        device = self.lm.embed_tokens.weight.device
        rows, valid, starts, ctc_logits = [], [], [], []
        for turn in turns:
            speech, logits = self.listen(turn.frames.to(device))
            sequence, keys, start = self.sequence(turn, speech)
            rows.append(sequence)
            valid.append(keys)
            starts.append(start)
            if with_losses:
                ctc_logits.append(logits)
        x, present = pad_rows(rows)
        key_valid = pad_rows(valid)[0] & present
        hidden = self.lm.body.forward_sequences(x, key_valid, self.checkpointed)  # [B, T, H]
        # Response token j of example b is predicted at position starts[b] - 1 + j.
        targets, target_mask = pad_rows([torch.tensor(t.response, device=device) for t in turns])
        where = torch.tensor(starts, device=device)[:, None] - 1 + torch.arange(targets.shape[1], device=device)
        where = where.clamp(max=hidden.shape[1] - 1)  # padded targets point anywhere valid; they are masked
        predicting = hidden.gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, R, H]
        # The eot target's predictor is dropped: inference never passes eot's state to the echo decoder.
        text_mask = target_mask.clone()
        text_mask[torch.arange(len(turns)), target_mask.sum(1) - 1] = False
        width = int(text_mask.sum(1).max())
        text = predicting[:, :width], targets[:, :width], text_mask[:, :width]
        if not with_losses:
            return SpeechToTextOutput(None, None, *text)
        cross_entropy = sequence_cross_entropy(self.lm.lm_head(predicting), targets, target_mask)
        transcripts, transcript_mask = pad_rows([torch.tensor(t.transcript, device=device) for t in turns])
        log_probs = F.log_softmax(torch.stack(ctc_logits).float(), dim=-1).transpose(0, 1)  # [750, B, V]
        ctc = ctc_loss(log_probs, transcripts, transcript_mask.sum(1), self.audio_patch)
        return SpeechToTextOutput(cross_entropy, ctc, *text)
