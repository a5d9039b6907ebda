"""Schedules: pure functions of the optimizer step, so a resumed run picks them up from the step alone.

DeepSpeed ships its own `WarmupCosineLR`, but its warmup is logarithmic by default and it counts
steps differently from what a recipe's `steps` says; we compute the factor here and hand DeepSpeed a
plain `LambdaLR` over it (see pipeline/engine.py).
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, *, total_steps: int, warmup_steps: int, final_ratio: float = 0.0) -> float:
    """Multiplier on the base learning rate at optimizer step `step` (0-based).

    Linear warmup over `warmup_steps` (step 0 already gets 1/warmup_steps, never 0), then a half cosine
    from 1 down to `final_ratio` at `total_steps`; constant at `final_ratio` after that.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps == 0:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
