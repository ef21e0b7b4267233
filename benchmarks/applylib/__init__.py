"""The parts of benchmarks/apply.py: layouts, measuring, the steps, the scale curve, the plot, --profile
and the single-size mode (see each module's docstring). The script adds benchmarks/ to sys.path."""
