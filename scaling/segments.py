"""A run's segments: the stretches of steps it trained, one per process start, each at the world
size it was started with (a run may resume on another one: docs/failure-model.md).

final.json's ``segments`` (schema: scaling.results) is the list of them, oldest first, saved
with every checkpoint; ``device_hours`` sums them. What a segment holds and how its hours are
counted: docs/results.md (`final.json`). Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Segments:
    """The segments before this process (`done`) and this process's own, open one."""

    world_size: int
    start_step: int = 0
    wall0: float = 0.0  # the run's wall seconds when this segment started
    op_build0: float = 0.0  # the run's uncharged seconds (scaling.meter.Meter.not_charged_s) then
    done: list[dict] = field(default_factory=list)

    @classmethod
    def resume(cls, client: dict, saved_world: int, world_size: int) -> Segments:
        """The segments of a checkpoint's client state, and a new one at `world_size` from its
        step. A checkpoint from before segments were saved is one segment from step 0."""
        meter = client.get("meter", {})
        wall = float(meter.get("wall", 0.0))
        # what Meter.not_charged_s() was at the save: op builds and torch.compile seconds
        build = float(meter.get("op_build", 0.0)) + float(meter.get("parts", {}).get("compile", 0))
        done = client.get("segments") or [
            segment(saved_world, 0, client["step"], wall, build)]
        return cls(world_size, client["step"], wall, build, [dict(s) for s in done])

    def upto(self, step: int, wall: float, op_build: float) -> list[dict]:
        """Every segment, this one ending at `step` at run wall seconds `wall` (Meter.wall())
        with `op_build` seconds left out of device hours so far (Meter.not_charged_s: op
        builds and torch.compile)."""
        return [*self.done, segment(self.world_size, self.start_step, step, wall - self.wall0,
                                    op_build - self.op_build0)]


def segment(world_size: int, start: int, end: int, wall_s: float, op_build_s: float) -> dict:
    """One segment as final.json records it."""
    return {"world_size": world_size, "start_step": start, "end_step": end, "wall_s": wall_s,
            "device_hours": max(0.0, wall_s - op_build_s) / 3600 * world_size}


def device_hours(segments: list[dict]) -> float:
    """Device hours over all segments."""
    return sum(s["device_hours"] for s in segments)
