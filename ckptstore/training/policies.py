"""When to save, and which checkpoints to keep: small composable policy objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class SavePolicy(Protocol):
    """Decides at a step whether to save. ``agreed`` policies give the same answer on every
    rank by construction; others (time-based) are agreed through one tiny collective."""

    agreed: bool

    def should_save(
        self, step: int, now: float, last_step: int | None, last_time: float | None
    ) -> bool: ...


@dataclass(frozen=True)
class EveryNSteps:
    """Save when ``step`` is a multiple of ``n``."""

    n: int
    agreed: bool = True

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError(f"EveryNSteps needs n > 0, got {self.n}")

    def should_save(
        self, step: int, now: float, last_step: int | None, last_time: float | None
    ) -> bool:
        """Whether to save at ``step`` (``now``: monotonic seconds; the last save's step
        and time, None before the first)."""
        return step % self.n == 0 and step != last_step


@dataclass(frozen=True)
class EveryNSeconds:
    """Save when at least ``seconds`` passed since the last save (ranks agree by all_reduce)."""

    seconds: float
    agreed: bool = False

    def should_save(
        self, step: int, now: float, last_step: int | None, last_time: float | None
    ) -> bool:
        """Whether to save at ``step`` (see :meth:`EveryNSteps.should_save`)."""
        return last_time is None or now - last_time >= self.seconds


@dataclass(frozen=True)
class AnyOf:
    """Save when any of ``policies`` says so."""

    policies: tuple[SavePolicy, ...]

    @property
    def agreed(self) -> bool:  # type: ignore[override]
        """Every rank answers alike without a collective (all the policies do)."""
        return all(p.agreed for p in self.policies)

    def should_save(
        self, step: int, now: float, last_step: int | None, last_time: float | None
    ) -> bool:
        """Whether any of the policies saves at ``step``."""
        return any(p.should_save(step, now, last_step, last_time) for p in self.policies)


class RetentionPolicy(Protocol):
    def keep(self, steps: list[int]) -> set[int]:
        """Of the committed ``steps`` (ascending), those to keep."""
        ...


@dataclass(frozen=True)
class KeepLast:
    """The ``n`` newest checkpoints."""

    n: int

    def keep(self, steps: list[int]) -> set[int]:
        """Of the committed ``steps`` (ascending), those to keep."""
        return set(steps[-self.n :]) if self.n > 0 else set()


@dataclass(frozen=True)
class KeepEvery:
    """Checkpoints whose step is a multiple of ``k`` (long-term milestones)."""

    k: int

    def keep(self, steps: list[int]) -> set[int]:
        """Of the committed ``steps`` (ascending), those to keep."""
        return {s for s in steps if s % self.k == 0}


@dataclass(frozen=True)
class KeepAll:
    """Every checkpoint (the manager's default)."""

    def keep(self, steps: list[int]) -> set[int]:
        """Of the committed ``steps`` (ascending), those to keep: all."""
        return set(steps)


@dataclass(frozen=True)
class KeepAny:
    """Keep what any of ``policies`` keeps (e.g. the last 3 and every 1000th)."""

    policies: tuple[RetentionPolicy, ...]

    def keep(self, steps: list[int]) -> set[int]:
        """Of the committed ``steps`` (ascending), those any policy keeps."""
        kept: set[int] = set()
        for p in self.policies:
            kept |= p.keep(steps)
        return kept
