"""The job's tracking actor. A module of its own, importing only Ray: every job starts one, and
its process imports the module that defines it (pipeline/plan.py would cost it seconds of CPU
importing torch and Ray Data for nothing)."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class JobTracker:
    """Rows finished per stage and rows written, for the progress line; each stage actor's latest
    figures, for the stats; and the job's stage actors, which execute ends. Ray Data only drops its
    handles to them, and an actor runs on through the batches queued on it, holding its CPUs and
    GPUs, after the job has failed."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.figures: dict[str, dict] = {}
        self.actors: list = []
        self.ended = False

    def add(self, key: str, rows: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + rows

    def get(self) -> dict[str, int]:
        return dict(self.counts)

    def report(self, key: str, figures: dict) -> None:
        self.figures[key] = figures

    def actor_figures(self) -> list[dict]:
        return list(self.figures.values())

    def join(self, actor) -> bool:
        """Keep ``actor`` (a stage actor's own handle, which does not keep it alive when Ray Data
        lets it go) to end with the job; False when the job has already ended."""
        if not self.ended:
            self.actors.append(actor)
        return not self.ended

    def end(self) -> list:
        self.ended = True
        return self.actors
