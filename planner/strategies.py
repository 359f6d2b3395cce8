"""The one registry of strategy names and what they are (pure Python: read by the planner and the runtime).

    from hsplit.planner.strategies import STRATEGIES, traits
    traits("hetlora").ranks            # "per-client"
    traits("splitlora").replannable    # True

Each strategy's runtime behaviour is one class in runtime/strategies/ (same name). Outside this file
and that package, code asks a strategy's traits, never compares its name.
"""
from __future__ import annotations

from dataclasses import dataclass

from hsplit.planner.errors import ConfigError


@dataclass(frozen=True)
class Traits:
    name: str
    ranks: str              # how the planner chooses ranks: "milp" (per matrix, per client: the integer
                            # program), "one" (one split and one rank for all), "per-client" (one rank per
                            # client, enumerated) or "reference" (nothing planned: no split)
    split: bool             # clients and server exchange activations (False: one unsplit model)
    model_adapter: str      # which adapter holds the aggregated model besides the merged base weights:
                            # "global" (the server's global adapter), "party" (the only party's) or "none"
    replannable: bool       # `replan:` in a plan may move its adapters between rounds
    merge_download: bool    # every client downloads the round's merged update (charged by the planner)


STRATEGIES: dict[str, Traits] = {t.name: t for t in (
    Traits("hsplitlora", ranks="milp", split=True, model_adapter="none", replannable=True, merge_download=True),
    Traits("splitlora", ranks="one", split=True, model_adapter="global", replannable=True, merge_download=False),
    Traits("hetlora", ranks="per-client", split=True, model_adapter="global", replannable=False,
           merge_download=False),
    Traits("flexlora", ranks="per-client", split=True, model_adapter="global", replannable=False,
           merge_download=False),
    Traits("hafl-truncation", ranks="per-client", split=True, model_adapter="global", replannable=False,
           merge_download=False),
    Traits("hafl-freezing", ranks="per-client", split=True, model_adapter="global", replannable=False,
           merge_download=False),
    Traits("centralized", ranks="reference", split=False, model_adapter="party", replannable=False,
           merge_download=False),
)}
NAMES = tuple(STRATEGIES)
DEFAULT = NAMES[0]


def traits(name: str, source: str = "strategy") -> Traits:
    """The traits of a registered strategy; a ConfigError naming the choices otherwise."""
    if name not in STRATEGIES:
        raise ConfigError(source, [f"strategy: must be one of {', '.join(NAMES)}, got {name!r}"])
    return STRATEGIES[name]
