"""The speedup model: what speedup a measured tau *should* give on given hardware, and why a run
falls short of a reference.

Why a model at all: a speedup is the product of two things that have nothing to do with each
other. Acceptance (tau, tokens emitted per target verification pass, bonus included) is a property
of the draft and the data; the cost of one speculative step relative to one plain decoding step is
a property of the hardware and the kernels. A DFlash draft that reaches tau 6 on a B200 gives ~5x
there and may give <1x on a CPU, where verifying 16 tokens costs many single-token steps. Without
splitting the two a user cannot tell whether to train a better draft or to stop blaming it.

The models (see ``shared/reference/dflash-method.md`` sections 1 and 4):

**DFlash (block-parallel draft), measured form.** One speculative step = one draft pass over the
block + one target verify pass, and it emits ``tau`` tokens on average. Plain decoding emits one
token per AR step. So, per emitted token::

    speedup = tau * t_ar_step / (t_draft + t_verify)

With costs relative to one AR step, ``c_draft = t_draft / t_ar_step`` and
``c_verify_extra = t_verify / t_ar_step - 1`` (what verifying a block costs beyond a single-token
step), this is the familiar ``speedup = tau / (1 + c_draft + c_verify_extra)``. The denominator,
``step_cost = (t_draft + t_verify) / t_ar_step``, is also the tau at which the method breaks even.

**Classic draft (Leviathan et al. 2023).** With per-token acceptance ``a`` and ``k`` drafted tokens
the expected tokens per target pass are ``E = (1 - a^(k+1)) / (1 - a)`` and the speedup is
``E / (k*c + 1)`` with ``c`` = one draft step's cost / one target step's cost (the verify pass is
assumed to cost one target step). The measured form above covers it too when ``t_draft`` is the
draft time of the whole step (all ``k`` draft passes).

**Gap attribution.** For any row, ``speedup = tau / step_cost`` where the *implied* step cost
``tau / speedup`` is in units of the baseline's per-token time. It is defined for published
numbers too, which publish only tau and speedup. Hence, exactly::

    ref_speedup / speedup = (ref_tau / tau) * (step_cost / ref_step_cost)
                            \\_ acceptance _/  \\_____ hardware cost ______/

and the share of the log-gap each factor explains says which one to work on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: share of the log-gap above which one factor is called "the" cause
DOMINANT_SHARE = 2 / 3
#: a run within this fraction of the reference speedup has no gap worth explaining
TOLERANCE = 0.05


# ---------------------------------------------------------------------- the models
def dflash_speedup(tau: float, t_ar_step: float, t_draft: float, t_verify: float) -> float:
    """Expected speedup of a block-parallel draft: ``tau * t_ar_step / (t_draft + t_verify)``."""
    if t_ar_step <= 0 or t_draft < 0 or t_verify <= 0:
        raise ValueError("pass times must be positive (t_draft may be 0)")
    return tau * t_ar_step / (t_draft + t_verify)


def dflash_speedup_from_ratios(tau: float, c_draft: float, c_verify_extra: float) -> float:
    """The same model in relative costs: ``tau / (1 + c_draft + c_verify_extra)``."""
    return tau / (1.0 + c_draft + c_verify_extra)


def expected_tokens(alpha: float, k: int) -> float:
    """Leviathan et al.: expected tokens per target pass, ``(1 - a^(k+1)) / (1 - a)``.

    At ``a = 1`` the limit is ``k + 1`` (every drafted token plus the bonus)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"acceptance rate {alpha} is outside [0, 1]")
    if k < 0:
        raise ValueError("k must be >= 0")
    if alpha == 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def classic_speedup(alpha: float, k: int, c: float) -> float:
    """Leviathan et al.: wall-time speedup ``E / (k*c + 1)`` of an autoregressive draft."""
    return expected_tokens(alpha, k) / (k * c + 1.0)


def break_even_tau(t_ar_step: float, t_draft: float, t_verify: float) -> float:
    """The tau a block draft needs just to match plain decoding on this hardware."""
    return (t_draft + t_verify) / t_ar_step


# ---------------------------------------------------------------------- measured rows
@dataclass(frozen=True)
class PassCosts:
    """Measured seconds of one AR step, one draft pass (per speculative step) and one verify."""

    t_ar_step: float
    t_draft: float
    t_verify: float

    @property
    def c_draft(self) -> float:
        return self.t_draft / self.t_ar_step

    @property
    def c_verify(self) -> float:
        return self.t_verify / self.t_ar_step

    @property
    def step_cost(self) -> float:
        """Cost of one speculative step in AR steps; equal to the break-even tau."""
        return (self.t_draft + self.t_verify) / self.t_ar_step


def _num(row: Mapping[str, Any], name: str) -> float | None:
    """A finite float from a row, or None (missing column, NULL, NaN, non-numeric)."""
    v = row.get(name)
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def pass_costs(row: Mapping[str, Any]) -> PassCosts | None:
    """The measured pass costs of a benchmark row (``ar_step_s``, ``draft_pass_s``,
    ``verify_pass_s``), or None when the benchmark did not record them."""
    ar, dr, vf = _num(row, "ar_step_s"), _num(row, "draft_pass_s"), _num(row, "verify_pass_s")
    if ar is None or dr is None or vf is None or ar <= 0 or vf <= 0 or dr < 0:
        return None
    return PassCosts(t_ar_step=ar, t_draft=dr, t_verify=vf)


def model_speedup(row: Mapping[str, Any]) -> float | None:
    """Speedup over the engine's own AR decoding predicted from the row's tau and pass costs."""
    costs, tau = pass_costs(row), _num(row, "tau")
    if costs is None or tau is None:
        return None
    return dflash_speedup(tau, costs.t_ar_step, costs.t_draft, costs.t_verify)


def implied_step_cost(row: Mapping[str, Any]) -> float | None:
    """``tau / speedup``: what one step cost in baseline per-token steps, as measured end to end
    (includes draft, verify and every overhead). Defined for published rows too."""
    tau, sp = _num(row, "tau"), _num(row, "speedup")
    if tau is None or sp is None or tau <= 0 or sp <= 0:
        return None
    return tau / sp


# ---------------------------------------------------------------------- gap attribution
@dataclass(frozen=True)
class GapExplanation:
    """Why ``row`` is slower (or not) than ``reference``; factors > 1 mean "costs the run"."""

    label: str
    tau: float
    speedup: float
    ref_tau: float
    ref_speedup: float
    step_cost: float
    ref_step_cost: float
    gap: float  # ref_speedup / speedup
    tau_factor: float  # ref_tau / tau
    cost_factor: float  # step_cost / ref_step_cost
    acceptance_share: float  # share of log(gap) explained by tau (may leave [0, 1])
    verdict: str  # "none", "acceptance", "hardware" or "both"
    text: str
    model_speedup: float | None = None  # from measured pass costs, vs the engine's AR decoding
    pass_costs: PassCosts | None = None


def explain_gap(row: Mapping[str, Any], reference: Mapping[str, Any], *, label: str = "reference",
                tolerance: float = TOLERANCE) -> GapExplanation | None:
    """Attribute the speedup gap between a benchmark row and a reference row (published or from
    other hardware) to acceptance (tau) or to hardware cost (step cost). None if either row lacks
    a usable tau or speedup."""
    tau, sp = _num(row, "tau"), _num(row, "speedup")
    rtau, rsp = _num(reference, "tau"), _num(reference, "speedup")
    cost, rcost = implied_step_cost(row), implied_step_cost(reference)
    if None in (tau, sp, rtau, rsp, cost, rcost):
        return None
    assert tau and sp and rtau and rsp and cost and rcost  # narrowed for the type checker
    gap, tau_f, cost_f = rsp / sp, rtau / tau, cost / rcost
    log_gap = math.log(gap)
    share = math.log(tau_f) / log_gap if abs(log_gap) > 1e-12 else 0.0
    if gap <= 1.0 + tolerance:
        verdict = "none"
    elif share >= DOMINANT_SHARE:
        verdict = "acceptance"
    elif share <= 1.0 - DOMINANT_SHARE:
        verdict = "hardware"
    else:
        verdict = "both"
    costs = pass_costs(row)
    text = _describe(label, verdict, sp, rsp, tau, rtau, cost, rcost, gap, tau_f, cost_f)
    model = model_speedup(row)
    if costs is not None and model is not None:
        text += (f" Measured passes: draft {costs.c_draft:.2f} + verify {costs.c_verify:.2f} AR "
                 f"steps per step, so tau must exceed {costs.step_cost:.2f} to break even; the "
                 f"model predicts {model:.2f}x over the engine's AR decoding.")
    return GapExplanation(label=label, tau=tau, speedup=sp, ref_tau=rtau, ref_speedup=rsp,
                          step_cost=cost, ref_step_cost=rcost, gap=gap, tau_factor=tau_f,
                          cost_factor=cost_f, acceptance_share=share, verdict=verdict, text=text,
                          model_speedup=model, pass_costs=costs)


def _describe(label: str, verdict: str, sp: float, rsp: float, tau: float, rtau: float,
              cost: float, rcost: float, gap: float, tau_f: float, cost_f: float) -> str:
    """One plain-English sentence group a user can act on."""
    head = f"Speedup {sp:.2f}x vs {rsp:.2f}x ({label})"
    if verdict == "none":
        return f"{head}: no shortfall (tau {tau:.2f} vs {rtau:.2f})."
    parts = (f"{head}, {gap:.2f}x short. Acceptance: tau {tau:.2f} vs {rtau:.2f} accounts for "
             f"{tau_f:.2f}x; step cost: {cost:.2f} vs {rcost:.2f} baseline steps per "
             f"speculative step accounts for {cost_f:.2f}x.")
    cause = {
        "acceptance": " The shortfall is mostly acceptance: a better-trained draft (more or "
                      "better-matched data, more epochs) would close it on this hardware.",
        "hardware": " The shortfall is mostly hardware cost: draft and verify passes cost more "
                    "baseline steps here; more acceptance alone will not close it.",
        "both": " Acceptance and hardware cost both contribute.",
    }[verdict]
    return parts + cause


def cost_breakdown(row: Mapping[str, Any], ar_speedup: float | None = None) -> dict[str, Any]:
    """Model vs measurement for one row: predicted speedup over the engine's AR decoding from
    measured passes, the measured speedup over that same AR decoding (``speedup / ar_speedup``,
    both against ``generate()`` in the same run) and their ratio (below 1 = overhead the passes
    do not explain: sampling, cache trimming, host syncs)."""
    costs = pass_costs(row)
    out: dict[str, Any] = {"c_draft": None, "c_verify": None, "break_even_tau": None,
                           "model_speedup_vs_ar": None, "measured_speedup_vs_ar": None,
                           "efficiency": None}
    if costs is None:
        return out
    model = model_speedup(row)
    out.update(c_draft=costs.c_draft, c_verify=costs.c_verify, break_even_tau=costs.step_cost,
               model_speedup_vs_ar=model)
    sp = _num(row, "speedup")
    if sp is not None and ar_speedup and ar_speedup > 0:
        measured = sp / ar_speedup
        out["measured_speedup_vs_ar"] = measured
        if model:
            out["efficiency"] = measured / model
    return out
