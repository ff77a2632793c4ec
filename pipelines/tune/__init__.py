"""σ-schedule and sampler tuning with Ray Tune: the search space (space), what trials run (trials), the two kinds of
job (modes), ASHA that survives a restart (asha), the objective (objective), the verdict's statistics (verdict) and the
job itself (job: run_tuning)."""
