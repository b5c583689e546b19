"""The run's time limit: a deadline per part, and the per-part log that estimates each case and skips what would
not fit."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable

GRACE_S = 20.0  # how far past its part's limit a running case may go before it is killed


class Budget:
    """The run's time limit as one deadline per part: part *i* ends by the start plus the shares of parts 1..*i*."""

    def __init__(self, shares_s: dict[str, float], clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.start = clock()
        self.ends: dict[str, float] = {}
        total = 0.0
        for part, share in shares_s.items():
            total += share
            self.ends[part] = self.start + total

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return self.clock() - self.start

    def left(self, part: str) -> float:
        """Seconds until ``part`` must end (negative once past)."""
        return self.ends[part] - self.clock()

    def fits(self, part: str, estimate_s: float) -> bool:
        """Whether a case expected to take ``estimate_s`` would end before ``part``'s limit."""
        return estimate_s <= self.left(part)

    def timeout(self, part: str) -> float:
        """Seconds a case started now may run before it is killed: to the part's limit plus a short grace."""
        return max(1.0, self.left(part) + GRACE_S)


class CaseLog:
    """Durations of the cases a part ran, the estimate for the next one, and the notes of what it skipped."""

    def __init__(self, part: str, budget: Budget, guesses_s: dict[str, float] | None = None) -> None:
        self.part, self.budget = part, budget
        self.guesses_s = guesses_s or {}
        self.durations: dict[str, list[float]] = defaultdict(list)
        self.skipped: list[str] = []

    def estimate(self, kind: str) -> float:
        """Expected seconds of a case of ``kind``: the mean of that kind so far, else its guess, else the part's mean
        so far, else zero (a part's first case always runs)."""
        same = self.durations.get(kind)
        every = [seconds for values in self.durations.values() for seconds in values]
        if same:
            return statistics.fmean(same)
        if kind in self.guesses_s:
            return self.guesses_s[kind]
        return statistics.fmean(every) if every else 0.0

    def should_run(self, kind: str, label: str) -> bool:
        """Whether the case fits the part's budget; records a note when it does not."""
        estimate = self.estimate(kind)
        if self.budget.fits(self.part, estimate):
            return True
        left = self.budget.left(self.part)
        self.skipped.append(f"{label}: skipped, {max(left, 0.0):.0f} s left of the budget, ~{estimate:.0f} s needed")
        print(f"[{self.budget.elapsed():6.1f}s] {self.skipped[-1]}", flush=True)
        return False

    def record(self, kind: str, seconds: float) -> None:
        self.durations[kind].append(seconds)
