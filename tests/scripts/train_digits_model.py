"""Started by tests/conftest.py in the background when a session's tests read the trained digits model: the NCSN of
examples/digits.py (2500 steps, seed 0), saved as a checkpoint at argv[1] (its EMA weights). It runs at the lowest CPU
priority, so it takes only the time the other tests leave idle (Ray's start-ups and waits) and does not slow them."""
import os
import sys
from pathlib import Path

import torch

os.nice(19)
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from digits import train_digits  # noqa: E402

from ncsn.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from ncsn.sigmas import Schedule  # noqa: E402

torch.set_num_threads(2)
model, schedule = train_digits(seed=0)
save_checkpoint(Path(sys.argv[1]), Checkpoint(model.config, Schedule(schedule.sigmas(), schedule.eps, schedule.steps_per_level),
                                              model.state_dict(), model.state_dict(), None, 2500))
