"""The registry of defenses: one entry per ``conf/defense/<name>.yaml`` ``name``.

An entry says which dataclass holds the defense's parameters (the one declaration of each hyper-parameter, in
the defense's objective file), which builder of :mod:`selfdestruct.pipeline.streams` draws its data, and how a
step is taken: the objective step and the batch roles it takes, run by the shared
:class:`~selfdestruct.modules.defense.DefenseModule`, or a module of its own when the step needs state the
shared module does not keep. README "Adding a defense" walks through adding one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from selfdestruct.modules.ctrap import CTRAPModule
from selfdestruct.modules.defense import DefenseModule
from selfdestruct.modules.npo import NPOModule
from selfdestruct.objectives.booster import BoosterParams, booster_step
from selfdestruct.objectives.ctrap import CtrapParams, ctrap_key_params
from selfdestruct.objectives.npo import NpoParams
from selfdestruct.objectives.repnoise import RepNoiseParams, repnoise_step
from selfdestruct.objectives.seam import SeamParams, seam_step
from selfdestruct.objectives.vaccine import VaccineParams, vaccine_step
from selfdestruct.pipeline import streams


@dataclass(frozen=True)
class Defense:
    """How the defense stage builds and trains one defense.

    ``params``: the parameter dataclass (None: the defense trains nothing, the aligned model is released).
    ``streams``: ``(bundle, params, encoding) -> DefenseData``. ``objective`` and ``roles``: the step the shared
    module calls as ``objective(model, *batches in roles order, params, reduce_fn=...)``. ``module``: a
    :class:`DefenseModule` subclass instead, built as ``module(model, optim, params, tokenizer=tokenizer)``.
    ``exact``: whether the parameters ask for double backward (the whole fit then runs with eager attention).
    ``key_params``: ``defense.params`` as the stage's cache key sees them (options that are off may be left out, so
    that entries cached before an option existed keep their keys).
    """

    params: type | None = None
    streams: Callable[..., streams.DefenseData] | None = None
    objective: Callable[..., dict[str, float]] | None = None
    roles: tuple[str, ...] = ()
    module: type[DefenseModule] | None = None
    exact: Callable[[Any], bool] = lambda p: False
    key_params: Callable[[dict], dict] = dict


DEFENSES: dict[str, Defense] = {
    "sft": Defense(),
    "seam": Defense(SeamParams, streams.seam_streams, seam_step, ("harmful", "refusal", "benign"),
                    exact=lambda p: p.estimator == "exact"),
    "ctrap": Defense(CtrapParams, streams.ctrap_streams, module=CTRAPModule, exact=lambda p: p.gradient == "exact",
                     key_params=ctrap_key_params),
    "repnoise": Defense(RepNoiseParams, streams.paired_streams, repnoise_step, ("harmful", "refusal")),
    "vaccine": Defense(VaccineParams, streams.role_streams("align"), vaccine_step, ("align",)),
    "npo": Defense(NpoParams, streams.role_streams("align", "harmful"), module=NPOModule),
    "booster": Defense(BoosterParams, streams.retain_streams, booster_step, ("retain", "harmful")),
}
