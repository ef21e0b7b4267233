"""patchkit.evaluation: a patch on a live model (generation, judges, tuning, reports)."""
