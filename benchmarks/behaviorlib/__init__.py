"""The behaviour benchmark's parts (benchmarks/behavior.py is the entry point): common (settings, the
capability measure, KL matching, generation and judging of a condition), judging (the judges and their
checks), paper (the model-surgery patches), methods and conditions (projection and damping patches and
their controls), search (the quick search), report and render (statistics, the aim check, tables),
refusal (the earlier refusal sweep)."""
