"""Token selection and acceptance rules for lossless speculative decoding.

Everything here works on one sequence (batch 1) and on plain tensors, so the rules can be unit
tested without a model. The acceptance rules are the part that makes speculative decoding
lossless; each function says which distribution its output follows.
"""

from __future__ import annotations

import torch


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A seeded generator, or None (use torch's global RNG) when no seed is given."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def logits_to_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) in float32 over the last dimension."""
    return torch.softmax(logits.float() / temperature, dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of `probs` [N, V] -> [N] token ids; rows are independent."""
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def select_tokens(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Target's choice at every row of `logits` [N, V]: argmax at T=0, else a sample at T.

    With a deterministic draft this is all verification needs: the target's own choice at
    position i is exactly what plain decoding would have produced given the same prefix.
    """
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    return sample(logits_to_probs(logits, temperature), generator)


def accept_deterministic(draft: list[int], target: list[int]) -> int:
    """Length of the longest prefix where the target's choices equal the draft tokens.

    `target` has one more entry than `draft` (the choice after the last draft token); the
    target's choice at index `n_accepted` is the bonus token. With a point-mass draft q this
    *is* rejection sampling: min(1, p(x)/q(x)) = p(x) is the chance that a target sample equals
    x, and on a mismatch the target sample follows p restricted to tokens != x, which is
    norm(max(0, p - q)). So greedy (T=0) and sampled (T>0) verification share this rule.
    """
    n = 0
    for d, t in zip(draft, target, strict=False):
        if d != t:
            break
        n += 1
    return n


def rejection_sample(
    p: torch.Tensor,
    q: torch.Tensor,
    draft: list[int],
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Speculative rejection sampling (Leviathan et al. 2023) for a stochastic draft.

    p: [k+1, V] target probabilities at the k draft positions plus the bonus position.
    q: [k, V] draft probabilities the k draft tokens were sampled from.
    Returns (n_accepted, next_token). Token i is kept with probability min(1, p_i(x)/q_i(x));
    the first rejected one is replaced by a draw from norm(max(0, p_i - q_i)), which makes
    the emitted token follow p_i exactly. If all k survive, the bonus is a draw from p_k.
    """
    k = len(draft)
    if k == 0:
        return 0, int(sample(p[:1], generator))
    idx = torch.tensor(draft, device=p.device)
    rows = torch.arange(k, device=p.device)
    p_x = p[rows, idx]
    q_x = q[rows, idx]
    # One uniform per position, drawn up front: the draws are independent of each other.
    u = torch.rand(k, generator=generator, device=p.device)
    # u < p/q written without the division, so q_x == 0 cannot produce inf/nan.
    accepted = (u * q_x < p_x).tolist()
    n = accepted.index(False) if False in accepted else k
    if n == k:
        return k, int(sample(p[k : k + 1], generator))
    residual = torch.clamp(p[n] - q[n], min=0.0)
    total = residual.sum()
    # residual sums to 0 only when p_n == q_n, where rejection has probability 0; a float
    # round-off can still land here, and p itself is then the right distribution.
    dist = residual / total if total > 0 else p[n]
    return n, int(sample(dist[None], generator))


def truncate_emitted(
    tokens: list[int], stop_token_ids: set[int], budget: int
) -> tuple[list[int], bool]:
    """Cut a run of accepted tokens at the first stop token (kept) and at `budget` tokens.

    Returns (tokens to emit, finished). `finished` is True when a stop token was emitted or the
    budget is used up, so nothing may follow.
    """
    out: list[int] = []
    for tok in tokens[:budget]:
        out.append(tok)
        if tok in stop_token_ids:
            return out, True
    return out, len(out) >= budget


def margin_top2(logits: torch.Tensor) -> float:
    """Top-1 minus top-2 logit of a [V] (or [1, V]) row.

    Used by the lossless audit: a greedy divergence between two numerically different but
    equivalent computations can only happen where this margin is tiny.
    """
    top = torch.topk(logits.reshape(-1).float(), k=2).values
    return float(top[0] - top[1])


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where two token lists differ, or None if they are equal.

    A list that is a strict prefix of the other diverges at its own length.
    """
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    if len(a) != len(b):
        return min(len(a), len(b))
    return None
