"""Per-client LoRA adapters on ONE copy of the base model (peft multi-adapter), with rank checks.

    bank = AdapterBank(model, family, alpha_over_rank=2.0, dropout=0.0, source="plan.yaml")
    bank.add("c0", {"model.layers.0.self_attn.q_proj": 8, ...})   # applies, then verifies ranks
    bank.activate("c0")                                           # swap client c0's adapters in
    A, B = bank.factors("c0")["model.layers.0.self_attn.q_proj"]  # lora_A (r, d_in), lora_B (d_out, r)
    bank.merge_into_base(module, B_cat, A_cat)                    # W += B_cat @ A_cat

The plan's ranks become PEFT `rank_pattern` / `alpha_pattern` keys that are escaped and anchored
(`^model\\.layers\\.3\\.self_attn\\.q_proj$`), so `layers.3` never matches `layers.13`. PEFT silently
ignores keys that match nothing, so after every `add` the rank of every LoRA layer is compared with
the plan: a missing, unplanned or wrong-rank adapter is a ConfigError naming the module.
lora_alpha = alpha_over_rank * rank: the scaling alpha/r is the same constant for every adapter.
"""
from __future__ import annotations

import re
import warnings
import zlib

import torch
from torch import nn

from hsplit.planner.errors import ConfigError
from hsplit.planner.model import GPT2, Family
from hsplit.runtime.models.partial_load import is_placeholder

# peft asks transformers' deprecated `is_gradient_checkpointing` when it wraps a model: a warning
# about peft's internals that users cannot act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

NO_ADAPTER = "__none__"   # activating this name switches every LoRA layer off


def rank_pattern_key(module_name: str) -> str:
    """An anchored, escaped regex that matches exactly this module name."""
    return "^" + re.escape(module_name) + "$"


def lora_config(ranks: dict[str, int], alpha_over_rank: float, dropout: float, family: Family):
    """The peft LoraConfig for one adapter with per-module ranks."""
    from peft import LoraConfig

    names = sorted(ranks)
    default_r = max(ranks.values())
    return LoraConfig(
        r=default_r, lora_alpha=alpha_over_rank * default_r, lora_dropout=dropout, bias="none",
        target_modules=names,
        rank_pattern={rank_pattern_key(n): ranks[n] for n in names},
        alpha_pattern={rank_pattern_key(n): alpha_over_rank * ranks[n] for n in names},
        fan_in_fan_out=family is GPT2, init_lora_weights=True)


def get_peft_model(model, config, **kw):
    """peft.get_peft_model, without the FutureWarning peft itself causes by reading transformers'
    deprecated `is_gradient_checkpointing` (nothing hsplit can change; every other warning shows)."""
    from peft import get_peft_model as peft_get_peft_model
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return peft_get_peft_model(model, config, **kw)


class AdapterBank:
    """Named LoRA adapters (one per client, plus optional extras) sharing one base model."""

    def __init__(self, model: nn.Module, family: Family, alpha_over_rank: float, dropout: float,
                 source: str = "<plan>"):
        self.model = model
        self.family = family
        self.alpha_over_rank = alpha_over_rank
        self.dropout = dropout
        self.source = source
        self.peft_model = None
        self.ranks: dict[str, dict[str, int]] = {}
        self._layers: dict[str, nn.Module] | None = None

    # ---- creating and checking adapters ----
    def add(self, name: str, ranks: dict[str, int], dropout: float | None = None) -> None:
        """Adapter `name` with these ranks (dropout: this adapter's LoRA dropout, default the bank's)."""
        ranks = {m: r for m, r in ranks.items() if r > 0}
        self._check_modules_exist(name, ranks)
        self.ranks[name] = dict(ranks)
        if not ranks:
            return                               # a client that trains nothing: no layers to add
        cfg = lora_config(ranks, self.alpha_over_rank, self.dropout if dropout is None else dropout, self.family)
        layers = self.layers() if self.peft_model is not None else {}
        if self.peft_model is not None and all(m in layers for m in ranks):
            # every module is a LoRA layer already: add the adapter to each directly (what peft's add_adapter
            # does for them, without its pass over every module of the model per target: client sampling
            # adds the round's clients every round)
            for m, layer in layers.items():
                if m in ranks:
                    layer.update_layer(name, ranks[m], lora_alpha=self.alpha_over_rank * ranks[m], target_name=m,
                                       config=cfg)
            self.peft_model.peft_config[name] = cfg
        elif self.peft_model is None:
            self.peft_model = get_peft_model(self.model, cfg, adapter_name=name)
        else:
            self.peft_model.add_adapter(name, cfg)
        self._layers = None
        self.verify(name)

    def delete(self, name: str) -> None:
        """Remove adapter `name` (re-planning rebuilds adapters at new ranks)."""
        if self.ranks.get(name):
            with warnings.catch_warnings():     # "Adapter k0 was active which is now deleted": activate() decides
                warnings.filterwarnings("ignore", message=".*was active which is now deleted", category=UserWarning)
                self.peft_model.delete_adapter(name)
            # peft re-activates what the layers had active (activate(None): a dummy name); point the
            # model-level active adapter at a real one so that add_adapter works again
            left = list(self.peft_model.peft_config)
            self.peft_model.base_model.active_adapter = left[0] if left else []
        self.ranks.pop(name, None)
        self._layers = None

    def _check_modules_exist(self, name: str, ranks: dict[str, int]) -> None:
        present = {n for n, _ in self.model.named_modules()}
        missing = [m for m in ranks if m not in present]
        if missing:
            raise ConfigError(self.source, [
                f"adapter {name}: module {m!r} does not exist in the model "
                f"({self.family.name} family; blocks are {self.family.blocks}.N.<{'|'.join(self.family.modules)}>)"
                for m in missing])

    def verify(self, name: str) -> None:
        """Every LoRA layer of adapter `name` has exactly its planned rank; nothing unplanned is adapted."""
        expected = self.ranks[name]
        actual = {m: int(layer.lora_A[name].weight.shape[0]) for m, layer in self.layers().items()
                  if name in layer.lora_A}
        problems = []
        for m, r in sorted(expected.items()):
            if m not in actual:
                problems.append(f"adapter {name}: module {m} was planned with rank {r} but got no LoRA layer")
            elif actual[m] != r:
                problems.append(f"adapter {name}: module {m} has rank {actual[m]}, planned {r}")
        for m in sorted(set(actual) - set(expected)):
            problems.append(f"adapter {name}: module {m} got a LoRA layer (rank {actual[m]}) but is not in the plan")
        for m in sorted(set(actual) & set(expected)):
            scaling = self.layers()[m].scaling[name]
            if abs(scaling - self.alpha_over_rank) > 1e-9:
                problems.append(f"adapter {name}: module {m} has scaling {scaling}, expected {self.alpha_over_rank}")
        if problems:
            raise ConfigError(self.source, problems)

    # ---- access ----
    def layers(self) -> dict[str, nn.Module]:
        """Module name (as in the base model) -> peft LoRA layer."""
        if self._layers is None:
            from peft.tuners.lora import LoraLayer
            self._layers = {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLayer)}
        return self._layers

    def activate(self, name: str | None, frozen: str | None = None) -> None:
        """Make `name` the only trainable active adapter (None: no adapter, the base model alone); `frozen`:
        a second adapter active with it whose factors get no gradient (a holder's base offset)."""
        names = [name or NO_ADAPTER] + ([frozen] if frozen else [])
        for layer in self.layers().values():
            layer.set_adapter(names if frozen else names[0])
            if frozen and frozen in layer.lora_A:
                layer.lora_A[frozen].requires_grad_(False)
                layer.lora_B[frozen].requires_grad_(False)

    def factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module -> (A, B) parameters of adapter `name` (A: (r, d_in), B: (d_out, r))."""
        layers = self.layers()
        return {m: (layers[m].lora_A[name].weight, layers[m].lora_B[name].weight) for m in self.ranks[name]}

    def parameters(self, name: str, modules=None) -> list[nn.Parameter]:
        out = []
        for m, (a, b) in self.factors(name).items():
            if modules is None or m in modules:
                out += [a, b]
        return out

    def state(self, name: str, copy: bool = True) -> dict[str, torch.Tensor]:
        """The adapter's tensors (copies unless copy=False), keyed `<module>.lora_A` / `<module>.lora_B`."""
        out = {}
        for m, (a, b) in self.factors(name).items():
            out[f"{m}.lora_A"] = a.detach().clone() if copy else a.detach()
            out[f"{m}.lora_B"] = b.detach().clone() if copy else b.detach()
        return out

    @torch.no_grad()
    def load_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        for m, (a, b) in self.factors(name).items():
            a.copy_(state[f"{m}.lora_A"])
            b.copy_(state[f"{m}.lora_B"])

    @torch.no_grad()
    def reinit(self, name: str, seed: int) -> None:
        """Fresh LoRA init (A: kaiming-uniform, B: 0), reproducible from `seed`.

        Each module draws from its own generator seeded by (seed, module name), so clients that
        share a module start from the same A (the first r rows of it, for a lower rank).
        """
        for m, (a, b) in self.factors(name).items():
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(m.encode())) % (1 << 62))
            # same distribution as peft's init (kaiming_uniform_ with a=sqrt(5) -> U(-1/sqrt(fan_in), ..))
            bound = 1.0 / a.shape[1] ** 0.5
            a.copy_(torch.rand(a.shape, generator=gen) * 2 * bound - bound)
            b.zero_()

    def _base_layer(self, module: str) -> nn.Module | None:
        """The frozen base layer of `module` (None when this process does not hold its block)."""
        layer = self.layers().get(module)
        if layer is None:          # no adapter on it now (resume replays merges of an earlier plan)
            from operator import attrgetter
            layer = attrgetter(module)(self.model)
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        return None if is_placeholder(base.weight) else base

    @torch.no_grad()
    def merge_into_base(self, module: str, b_cat: torch.Tensor, a_cat: torch.Tensor) -> None:
        """W += B_cat @ A_cat (the exact aggregated update) in the base layer of `module`; nothing when
        this process does not hold the block (a distributed process loads only its part)."""
        base = self._base_layer(module)
        if base is not None:
            delta = b_cat.to(base.weight.dtype) @ a_cat.to(base.weight.dtype)
            base.weight += delta.T if self.family is GPT2 else delta

    @torch.no_grad()
    def merge_dense(self, module: str, delta: torch.Tensor) -> None:
        """W += delta ((d_out, d_in)) in the base layer of `module` (blocks this process lacks: nothing)."""
        base = self._base_layer(module)
        if base is not None:
            delta = delta.to(base.weight.device, base.weight.dtype)
            base.weight += delta.T if self.family is GPT2 else delta

    def base_weight(self, module: str) -> torch.Tensor:
        """The frozen weight in (d_out, d_in) orientation."""
        w = self.layers()[module].get_base_layer().weight
        return w.T if self.family is GPT2 else w
