"""How closely a pruned model follows the full one on natural text: next-token agreement, KL, greedy match.

For a prompt (natural text, no question) both models give the distribution of the next token at the
last position and a greedy continuation:

- `top1`: 1 if their most likely next tokens agree;
- `kl`: KL(full || pruned) of the next-token distributions, in nats;
- `exact`: 1 if the greedy continuations (``new_tokens`` tokens) are identical;
- `prefix`: how many leading continuation tokens agree (out of ``new_tokens``).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Continuation:
    """One model's view of one prompt: next-token log-probabilities and its greedy continuation."""

    log_probs: torch.Tensor  # [vocab], float32
    tokens: tuple[int, ...]


def continuation(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, pad_token_id: int) -> Continuation:
    """Last-position log-probabilities (one prefill) and `new_tokens` greedy tokens (generate)."""
    with torch.inference_mode():
        logits = model(ids, logits_to_keep=1).logits[0, -1].float()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad_token_id)
    return Continuation(torch.log_softmax(logits, -1), tuple(out[0, ids.shape[1]:].tolist()))


def compare(full: Continuation, pruned: Continuation) -> dict[str, float]:
    """The four fidelity numbers of one prompt (see the module docstring)."""
    p = full.log_probs.exp()
    kl = float((p * (full.log_probs - pruned.log_probs)).sum().clamp(min=0.0))
    prefix = 0
    for a, b in zip(full.tokens, pruned.tokens):
        if a != b:
            break
        prefix += 1
    return {
        "top1": float(full.log_probs.argmax() == pruned.log_probs.argmax()),
        "kl": kl,
        "exact": float(full.tokens == pruned.tokens),
        "prefix": float(prefix),
    }


def natural_prompt(ids: list[int], length: int, seed: int) -> torch.Tensor:
    """`length` tokens of a tokenized text `ids`, from a seed-chosen place (plain text, no chat template)."""
    if len(ids) < length + 1:
        ids = ids * (length // max(1, len(ids)) + 2)
    start = torch.randint(0, len(ids) - length, (1,), generator=torch.Generator().manual_seed(seed)).item()
    return torch.tensor([ids[start:start + length]], dtype=torch.long)
