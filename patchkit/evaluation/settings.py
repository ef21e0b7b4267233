"""What `evaluate` and `tune` share, declared once: `RunSettings`, whose fields are keyword arguments of
both functions (`evaluate(model, patches, **settings.kwargs())`) and whose field metadata (help,
type, lower bound, choice) makes the options of `patchkit eval` and `patchkit tune`. `Placement`,
its first two fields, is where `method.pipeline.load_model` puts the model (`patchkit probe` too).

Standard library only: the command reads it at import, without torch. A command may give a field
another default or help (`COMMAND_DEFAULTS`), never another name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from ..method.choices import DeviceMap


def setting(default: Any, help: str, *, type: type = str, min: float | None = None, choice: type[Enum] | None = None,
            flag: bool = False) -> Any:
    """A field of RunSettings with what its command-line option needs."""
    return field(default=default, metadata={"help": help, "type": type, "min": min, "choice": choice, "flag": flag})


@dataclass
class Placement:
    """Where the model's weights go when it is loaded (keyword arguments of `load_model`)."""

    device_map: str | None = setting(None, "Where the model's layers go (accelerate): auto spreads them over the GPUs, "
                                           "the CPU and disk; cpu or cuda puts them all on one.", choice=DeviceMap)
    max_memory: str | None = setting(None, "At most SIZE (2GiB, 1500MB) of weights on each device (implies --device-map auto).")

    def kwargs(self) -> dict:
        """The keyword arguments of the library function (`evaluate`, `tune`, `train_probe_for`)."""
        return asdict(self)


@dataclass
class RunSettings(Placement):
    """The text read, how continuations are generated, the judges' check, and where the model is loaded."""

    prompts: str = setting("builtin:toxicity-eval", "Prompts to continue: FILE (.jsonl/.txt) or builtin:NAME.")
    benign: str = setting("builtin:benign-requests", "Text for perplexity and KL: FILE or builtin:NAME.")
    judge_check: str | None = setting(None, "Labelled FILE or builtin:NAME (its held-out split) to measure the judges' accuracy.")
    force_judge: bool = setting(False, "Allow a probe judge that is the probe the patches are made with.", flag=True)
    samples: int = setting(4, "Sampled continuations per prompt (0: greedy only).", type=int, min=0)
    temperature: float = setting(0.9, "Of the samples; 0: greedy only.", type=float, min=0)
    max_new_tokens: int = setting(20, "Tokens generated per continuation.", type=int, min=1)
    batch_size: int = setting(16, "Texts per forward pass.", type=int, min=1)
    limit: int | None = setting(None, "Use N prompts, evenly spread over the set.", type=int, min=1)
    benign_limit: int = setting(32, "Use N benign texts.", type=int, min=1)
    seed: int = setting(0, "Of the sampled continuations (and, in eval, of the controls).", type=int)


# Where tune differs from eval: a smaller greedy run by default, on the toxic prompts.
COMMAND_DEFAULTS: dict[str, dict[str, dict]] = {
    "eval": {
        "prompts": {"help": "Prompts to continue: FILE (.jsonl/.txt) or builtin:NAME "
                            "(toxicity-eval: 300 RealToxicityPrompts + held-out ToxiGen)."},
        "judge_check": {"help": "Labelled FILE or builtin:NAME (its held-out split and all of it) to measure the judges' quality."},
    },
    "tune": {
        "prompts": {"default": "builtin:toxic-prompts"},
        "samples": {"default": 1, "min": 1, "help": "Continuations per prompt."},
        "temperature": {"default": 0.0, "help": "0: greedy."},
        "max_new_tokens": {"default": 32},
        "limit": {"default": 32},
    },
}
