"""Autoregressive sampling from a GPTModel: greedy, temperature, top-k and top-p.

One sequence at a time, recomputing the whole context for every new token (no KV cache):
simple and exact, and fast enough for short outputs from small models. The logits of the
padded vocabulary (the dummy ids that round the embedding up to a GEMM-friendly size) are
cut off before sampling, so only ids the tokenizer knows can come out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron.errors import UsageError

logger = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    """How to pick the next token. ``temperature == 0`` is greedy (argmax)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1.0: no nucleus cut

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UsageError(f"--temperature {self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise UsageError(f"--top-k {self.top_k} must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p {self.top_p} must be in (0, 1] (1 disables it)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits_bv: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set the logits outside the top-k / top-p (nucleus) set to -inf; [b, V] -> [b, V]."""
    out = logits_bv.clone()
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth_bv = torch.topk(out, top_k, dim=-1).values[..., -1:]  # [b, 1]
        out = out.masked_fill(out < kth_bv, float("-inf"))
    if top_p < 1.0:
        sorted_bv, order_bv = torch.sort(out, dim=-1, descending=True)
        probs_bv = torch.softmax(sorted_bv, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass
        # (so the most likely token always stays).
        mass_before_bv = torch.cumsum(probs_bv, dim=-1) - probs_bv
        drop_sorted_bv = mass_before_bv >= top_p
        drop_bv = torch.zeros_like(drop_sorted_bv).scatter(-1, order_bv, drop_sorted_bv)
        out = out.masked_fill(drop_bv, float("-inf"))
    return out


def sample_next(
    logits_bv: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token id of each row, [b]; ``logits_bv`` must hold only real vocabulary ids."""
    logits_bv = logits_bv.float()
    if params.greedy:
        return torch.argmax(logits_bv, dim=-1)
    filtered_bv = filter_logits(logits_bv / params.temperature, params.top_k, params.top_p)
    probs_bv = torch.softmax(filtered_bv, dim=-1)
    return torch.multinomial(probs_bv, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    vocab_size: int,
    params: SamplingParams,
    *,
    max_context: int,
    stop_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> list[int]:
    """Extend ``prompt_ids`` by up to ``max_new_tokens`` sampled ids; return only the new ids.

    ``model(tokens, position_ids)`` must return logits [b, s, padded_vocab]; everything from
    ``vocab_size`` on is padding and never sampled. The context is the last ``max_context``
    tokens (the model's trained length), with positions counted from 0. Generation stops
    early after an id in ``stop_ids`` (e.g. end of document), which is included.
    """
    if max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens {max_new_tokens} must be >= 0")
    if not prompt_ids:
        raise UsageError("the prompt is empty after tokenization; give some text with --prompt")
    was_training = model.training
    model.eval()
    tokens = list(prompt_ids)
    new: list[int] = []
    stop = set(int(i) for i in stop_ids)
    try:
        for _ in range(max_new_tokens):
            context = tokens[-max_context:]
            tokens_bs = torch.tensor([context], dtype=torch.long, device=device)  # [1, s]
            position_ids_bs = torch.arange(len(context), device=device).unsqueeze(0)  # [1, s]
            logits_bsv = model(tokens_bs, position_ids_bs)  # [1, s, padded_vocab]
            logits_bv = logits_bsv[:, -1, :vocab_size]  # padded ids cut off
            next_id = int(sample_next(logits_bv, params, generator)[0])
            tokens.append(next_id)
            new.append(next_id)
            if next_id in stop:
                break
    finally:
        model.train(was_training)
    return new
