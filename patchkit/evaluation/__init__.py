"""patchkit.evaluation: what a patch does to a live model, measured.

Here live applying and reverting a patch on tensors in memory, checked bit for bit (inmemory),
the evaluation itself: generation, judged continuations, perplexity and KL (evaluate), the
controls of the same size (controls), the comparisons with the base and the controls
(comparisons) and their statistics in numpy (stats), probe data the model writes and a judge
labels (selflabel),
the judges (judges) and the Jigsaw classifier run in torch (jigsaw), reading its pickled
vocabulary without executing it (safepickle), perplexity and KL on benign text (capability), the
search for K and alpha, a projection's lam or damping's fraction within a capability budget (tune,
strength), the settings eval and tune share
(settings), the option values as enums (choices), the tables and HTML report (report), and the demo. It may import patchkit.core, patchkit.method,
patchkit.share and torch/transformers; nothing imports it but patchkit.cli (and the top-level
`patchkit.evaluate`). `evaluate` and `tune`, the functions, are `patchkit.evaluate` and
`patchkit.evaluation.tune.tune`: here the names are the modules'.
"""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "apply_in_memory": "patchkit.evaluation.inmemory",
    "revert_in_memory": "patchkit.evaluation.inmemory",
    "patched": "patchkit.evaluation.inmemory",
    "attach_evaluation": "patchkit.evaluation.evaluate",
    "make_controls": "patchkit.evaluation.evaluate",
    "make_judge": "patchkit.evaluation.judges",
    "render_table": "patchkit.evaluation.report",
    "write_report": "patchkit.evaluation.report",
})
del lazy_exports
