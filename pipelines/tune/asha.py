"""ASHA that keeps its rungs across a restarted tuning driver. Ray Tune does not save the scheduler with the experiment:
`Tuner.restore` rebuilds it as it was at the start (ray-project/ray#30838), so every result recorded at the rungs would be
lost and the trials after a restart compared only with each other. This one appends each result it judges to a file in
the experiment directory and, restored, replays that file in its order before judging the next result."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

log = logging.getLogger(__name__)


class ResumableASHA(ASHAScheduler):
    """ASHA on the training step (a resumed trial's Tune iterations restart at 1), its results kept in ``history``."""

    def __init__(self, history: str, **kwargs):
        super().__init__(time_attr="step", **kwargs)
        self.history = history
        Path(history).parent.mkdir(parents=True, exist_ok=True)
        self._replayed = False
        self._stopped_before: set[str] = set()  # trials the restored rungs had already stopped

    def _replay(self) -> None:
        """Feed the results judged before the restart to the rungs, in their order; the trials they stopped stay stopped."""
        self._replayed = True
        path = Path(self.history)
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []
        for row in rows:  # (a result at max_t ends its trial without a rung decision, as on_trial_result does)
            bracket = self._trial_info.get(row["trial_id"])
            if bracket is None or row["trial_id"] in self._stopped_before or row["step"] >= self._max_t:
                continue
            if bracket.on_result(SimpleNamespace(trial_id=row["trial_id"]), row["step"], row["reward"]) == TrialScheduler.STOP:
                self._stopped_before.add(row["trial_id"])
        if rows:
            log.info("ASHA: %d results of %d trials replayed from %s", len(rows), len({r["trial_id"] for r in rows}), path)

    def _record(self, trial_id: str, result: dict) -> None:
        if self._time_attr in result and self._metric in result:
            with open(self.history, "a") as f:
                f.write(json.dumps({"trial_id": trial_id, "step": result[self._time_attr],
                                    "reward": self._metric_op * result[self._metric]}) + "\n")

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if not self._replayed:  # every restored trial has been added by now
            self._replay()
        if trial.trial_id in self._stopped_before:
            return TrialScheduler.STOP
        self._record(trial.trial_id, result)
        return super().on_trial_result(tune_controller, trial, result)

