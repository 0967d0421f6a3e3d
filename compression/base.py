"""The KV compression contract: one base class, one registry, one way to build a method by name.

A method is one dataclass (its parameters as fields) registered under the name settings and the CLI
use, the way a kvpress press is one class:

    @COMPRESSORS.register("mean_pool")
    @dataclass
    class MeanPool(Compressor):
        def pool(self, keys, values, layer_idx):
            return keys.mean(-2), values.mean(-2)

It writes one method:
- `pool`: a *window method* (dense, mean_pool, fmkvc): every full window of W cached (k, v) becomes
  one super-token; `compression.cache.FMKVCCache` runs it during prefill and decode, so the method
  can back an agent's generation, and `compression.presses.WindowPress` runs it as a kvpress press;
- or `press`: a *pruning baseline* from kvpress (StreamingLLM, SnapKV, ...), a press applied once at
  prefill to transformers' dense cache (`serves()` is False: not a self-compressing cache); eval-cache
  runs it, and a session cache prunes with its scores (compression/session.py: `PrunedCache`).

What else a method can do is asked through capability methods with safe defaults (as transformers'
`CacheLayerMixin` does for cache layers): `compresses`, `serves`, `proportional`, `max_window`,
`refinement`, `bind`. Readers of the registry (`compression.cache.cache_factory`, the presses,
eval-cache and its CLI) build methods with `build`; `compression.methods` imports every module that
registers one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from compression import attention
from latentwire.registry import Registry

COMPRESSORS: Registry[type["Compressor"]] = Registry("KV compression method")


@dataclass(frozen=True)
class Schedule:
    """Where a window method compresses: sink + (keep exact entries + one super-token) per full window
    of W + recent.

    `keep` > 0 is the hybrid memory: in each window the `keep` entries the method's query-agnostic
    `importance` ranks highest stay exact and the other W - keep are pooled into the super-token, so a
    window costs keep + 1 entries (reduction W / (keep + 1)). Pooling loses what sets one token apart
    from its window (a name, a number in a sentence of prose); the kept entries are meant to be those.
    """

    window: int = 8  # W tokens -> keep + 1 entries
    sink: int = 4  # first tokens kept dense (attention sinks)
    recent: int = 64  # newest tokens kept dense
    enabled: bool = True
    keep: int = 0  # exact entries kept per window, chosen by Compressor.importance
    # False: keep the newest entries instead of pooling (as many as pooling would leave): what a
    # model's sliding-window layers get in a session (see compression.cache.sliding_layer_schedule)
    pool: bool = True

    def __post_init__(self):
        if self.keep < 0 or (self.keep and self.keep > self.window - 2):
            raise ValueError(f"keep={self.keep}: a window of {self.window} keeps 0 to {self.window - 2} "
                             f"exact entries (at least two are pooled)")

    @property
    def per_window(self) -> int:
        """Entries a compressed window leaves: its kept exact entries and its super-token."""
        return self.keep + 1

    def expected_length(self, n_tokens: int) -> int:
        """Stored entries after n_tokens (non-sliding layer)."""
        if not self.enabled or n_tokens < self.sink + self.window + self.recent:
            return n_tokens
        m = (n_tokens - self.sink - self.recent) // self.window
        return n_tokens - m * (self.window - self.per_window)


@dataclass
class Compressor:
    """Base of every KV compression method; subclasses are dataclasses whose fields are the options."""

    # ---- the one method a method writes (see the module docstring) -----------------------------
    def pool(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """keys/values (B, H, m, W, head_dim) -> (k~, v~) each (B, H, m, head_dim): one per window."""
        raise NotImplementedError(f"{type(self).__name__} does not pool windows")

    def press(self, compression_ratio: float, schedule: Schedule):
        """A kvpress press that prunes the prefilled cache by `compression_ratio` (pruning baselines)."""
        raise NotImplementedError(f"{type(self).__name__} is not a kvpress press")

    def __call__(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int):
        return self.pool(keys, values, layer_idx)

    def importance(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """keys/values (B, H, m, W, head_dim) -> (B, H, m, W) scores, higher = keep exact (`Schedule.keep`).

        Query-agnostic (no question is known when a window is compressed). The default is KNorm's
        signal (Devoto et al., 2024; kvpress `KnormPress`): keys of low norm draw the most attention,
        so the lowest-norm keys of a window stay exact."""
        return -keys.float().norm(dim=-1)

    # ---- capabilities ---------------------------------------------------------------------------
    def compresses(self) -> bool:
        """False for the dense ceiling: its cache keeps every token."""
        return True

    def serves(self) -> bool:
        """Whether it can be an agent's cache (it keeps compressing as the cache grows while decoding)."""
        return True

    def proportional(self) -> bool:
        """Whether a super-token carries the attention mass of its W tokens (compression/attention.py)."""
        return False

    def max_window(self) -> int | None:
        """The largest W it can pool (a learned sidecar has position embeddings for so many); None: any."""
        return None

    def refinement(self):
        """A compression.refine.RefineConfig: refit the super-tokens on each prompt's tail; None: off."""
        return None

    def bind(self, model, schedule: Schedule) -> None:
        """Get ready to compress `model`'s cache with `schedule` (load weights on its device, switch its
        attention); refuses a schedule it cannot run."""
        limit = self.max_window()
        if schedule.enabled and limit is not None and schedule.window > limit:  # else it fails at the first window
            raise ValueError(f"the {self.name()} method compresses windows of up to {limit} tokens, "
                             f"not {schedule.window}")
        if schedule.enabled and self.proportional():
            attention.enable(model)

    # ---- naming -----------------------------------------------------------------------------------
    @classmethod
    def name(cls) -> str:
        return next((n for n in COMPRESSORS if COMPRESSORS.get(n) is cls), cls.__name__)

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The option names this method takes (its init fields)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)


@dataclass
class KVPressBaseline(Compressor):
    """A pruning baseline: a kvpress press at a compression ratio; subclasses write `press`. It prunes
    transformers' dense cache once at prefill, so eval-cache runs it and an agent's cache cannot."""

    def serves(self) -> bool:
        return False


SLIDING_LAYERS = ("pool", "newest")  # what a window method does on a model's sliding-window layers
# how the hybrid memory picks its exact entries: per window by the method's `importance`, or across
# each prompt by context reconstruction (compression/reconstruction.py)
SELECT = ("window", "reconstruction")


def method_spec(spec: str) -> tuple[str, dict]:
    """A --methods entry of eval-cache and eval-session: a method name, then for a window method
    ":option=value" layout options. "fmkvc" -> ("fmkvc", {}); "fmkvc:keep=1:sliding_layers=pool" ->
    ("fmkvc", {"keep": 1, "sliding_layers": "pool"}). `keep` exact entries per window (`Schedule.keep`)
    at the same ratio, so its window is ratio x (keep + 1) tokens; `sliding_layers` what the model's
    sliding-window layers do (compression.cache.sliding_layer_schedule); `select` how the exact
    entries are chosen (`check_select`, compression.cache.reconstruction)."""
    name, *opts = spec.split(":")
    layout: dict = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "keep" and value.isdigit():
            layout[key] = int(value)
        elif (key == "sliding_layers" and value in SLIDING_LAYERS) or (key == "select" and value in SELECT):
            layout[key] = value
        else:
            raise ValueError(f"method {spec!r}: options are keep=N, sliding_layers={'|'.join(SLIDING_LAYERS)} "
                             f"and select={'|'.join(SELECT)}, not {opt!r}")
    try:
        check_select(layout.get("select", "window"), layout.get("keep", 0))
    except ValueError as exc:
        raise ValueError(f"method {spec!r}: {exc}") from None
    return name, layout


def check_select(select: str, keep: int) -> None:
    """A `select` option (SELECT) with the `keep` it chooses from: "reconstruction" chooses exact
    entries, so it needs keep >= 1."""
    if select not in SELECT:
        raise ValueError(f"select={select!r}: one of {', '.join(SELECT)}")
    if select != "window" and not keep:
        raise ValueError(f"select={select!r} chooses the exact entries of the hybrid memory: it needs keep >= 1")


def takes(option: str) -> list[str]:
    """Registered methods that take `option`."""
    return [n for n in COMPRESSORS if option in COMPRESSORS.get(n).options()]


def build(name: str, *, context: dict[str, Any] | None = None, **options) -> Compressor:
    """The registered method `name` with `options`.

    An option the method does not take is an error if it is set (not None and not the default of the
    methods that take it), so a setting never silently does nothing; `context` (e.g. the model
    profile) goes to the methods that take it and is dropped by the others.
    """
    cls = COMPRESSORS.get(name)  # an unknown name: UnknownKind listing the known ones
    own = set(cls.options())
    kwargs = {k: v for k, v in (context or {}).items() if k in own}
    for key, value in options.items():
        if key in own:
            kwargs[key] = value
            continue
        takers = takes(key)
        defaults = {_default(COMPRESSORS.get(n), key) for n in takers}
        if value is None or (len(takers) > 0 and defaults == {value}):
            continue
        needs = " or ".join(repr(n) for n in takers) or "no registered method"
        raise ValueError(f"{key}={value!r} is not an option of KV compression method {name!r}: "
                         f"{key} needs method {needs}, not {name!r}")
    return cls(**kwargs)


def _default(cls: type[Compressor], option: str):
    field = next(f for f in dataclasses.fields(cls) if f.name == option)
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else dataclasses.MISSING
