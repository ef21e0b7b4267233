"""patchkit.share: patches and checkpoints in and out, the only code that reaches the network.

Here live where a patch or model comes from, a local path or a Hub reference (sources, with the one
parser of model references), the Hub connection: references, environment, errors (hub), downloads
into the HF cache (download), uploads in one commit (push), model cards (card, no I/O), PEFT/LoRA
export (export) and the export formats' enum (choices). Only
these modules import huggingface_hub, and only inside the functions that need it. They may
import patchkit.core (and patchkit.errors), never method, evaluation or cli.
"""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "resolve_patch": "patchkit.share.sources",
    "parse_model": "patchkit.share.sources",
    "model_source": "patchkit.share.sources",
    "download_patch": "patchkit.share.download",
    "download_model": "patchkit.share.download",
    "push_patch": "patchkit.share.push",
    "push_checkpoint": "patchkit.share.push",
    "render_card": "patchkit.share.card",
    "export_peft": "patchkit.share.export",
})
del lazy_exports
