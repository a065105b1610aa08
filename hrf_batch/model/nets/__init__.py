"""Network modules (nn.Modules only): the CCT, the MIL baseline and the task heads.

Every architecture takes ``(B, 1, H, W)`` normalised B-scans and returns logits
``(B, task.n_outputs)``; its ``arch`` name and ``arch_kwargs`` rebuild it (see
:mod:`hrf_batch.model.files`). :data:`PRESETS` maps a preset name to ``(arch, kwargs)``.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from hrf_batch.model.nets.cct import (
    CCT,
    CCT_PRESETS,
    POOLINGS,
    POS_EMBEDS,
    LrpAware,
    build_cct,
    conservative,
    count_parameters,
    set_lrp_mode,
)
from hrf_batch.model.nets.heads import TASKS, Task, get_task
from hrf_batch.model.nets.mil import (
    ALEXNET_WEIGHTS_FILE,
    MIL_PRESETS,
    MilNet,
    PretrainedWeightsError,
    patch_boxes,
    patch_grid,
    retina_band,
)

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"cct": CCT, "mil": MilNet}

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    **{name: ("cct", kwargs) for name, kwargs in CCT_PRESETS.items()},
    **{name: ("mil", kwargs) for name, kwargs in MIL_PRESETS.items()},
}


def build_preset(name: str, task: str = "binary", **overrides: Any) -> nn.Module:
    """A fresh model from a preset name, with keyword overrides (e.g. ``pooling="seq"``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    arch, kwargs = PRESETS[name]
    return ARCHITECTURES[arch](task, **{**kwargs, **overrides})


__all__ = [
    "ALEXNET_WEIGHTS_FILE", "ARCHITECTURES", "CCT", "CCT_PRESETS", "LrpAware", "MIL_PRESETS", "MilNet",
    "POOLINGS", "POS_EMBEDS", "PRESETS", "PretrainedWeightsError", "TASKS", "Task", "build_cct",
    "build_preset", "conservative", "count_parameters", "get_task", "patch_boxes", "patch_grid",
    "retina_band", "set_lrp_mode",
]
