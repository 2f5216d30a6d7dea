"""Shared test helpers."""

from __future__ import annotations

from typing import Any


def kill_sampling_after(policy: Any, n_calls: int) -> None:
    """Make ``policy.sample`` raise ``KeyboardInterrupt`` (a simulated kill) on every call after the
    first ``n_calls``: the interrupted half of the resume tests."""
    real, calls = policy.sample, [0]

    def sample(*a: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] > n_calls:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **kw)

    policy.sample = sample
