"""How z reaches the routers: a per-forward state in a context variable, never on modules or classes.

A patched model's forward pushes a `ForwardState` (z, attention mask, the routes computed so far, aux terms) for the
duration of the call; every CuMALinear of that model looks it up by its owner. Gradient-checkpointed layers replay
their forward during backward, after the call returned: `wrap_checkpoint_function` captures the active states when
the layer runs and re-activates them for the replay, so recomputation routes with the same z.
"""
from __future__ import annotations

import contextlib
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

_ACTIVE: ContextVar[tuple] = ContextVar("cuma_active_forwards", default=())
_PENDING: ContextVar[tuple] = ContextVar("cuma_pending_conditioning", default=())
_RECORDERS: ContextVar[tuple] = ContextVar("cuma_routing_recorders", default=())
_DISABLED: ContextVar[tuple] = ContextVar("cuma_disabled_adapters", default=())


@dataclass
class Route:
    """One router's decision for one input: flat [T, k] weights (float32) and indices (int32).

    `dispatch` (the tokens sorted by expert) is computed on first use and shared by every module using the route.
    `shrink`: set by the first module to use the route (None until then): sibling module -> its slice of the one
    shrink launch run for all of them on this input; each sibling takes (pops) its own.
    """

    topk_weights: torch.Tensor
    topk_idx: torch.Tensor
    dispatch: object = None
    shrink: dict | None = None


@dataclass
class ForwardState:
    owner: object
    demographic_embeds: torch.Tensor | None
    attention_mask: torch.Tensor | None = None
    compute_aux: bool = False
    routes: dict = field(default_factory=dict)  # router key -> (weakref to x, Route)
    token_shape: tuple | None = None  # (batch, seq) of the call, from the first [batch, seq, hidden] input seen
    aux_terms: list = field(default_factory=list)
    routed_layers: dict | None = None  # router key -> the owner's layers it routes, in patching order (on first use)

    def cached_route(self, key: str, x: torch.Tensor) -> Route | None:
        hit = self.routes.get(key)
        if hit is not None and hit[0]() is x:
            return hit[1]
        return None

    def store_route(self, key: str, x: torch.Tensor, route: Route) -> None:
        self.routes[key] = (weakref.ref(x), route)

    def layers_routed_by(self, key: str) -> list:
        """The adapted layers of this state's model that the router `key` routes (q/k/v or gate/up siblings)."""
        if self.routed_layers is None:
            self.routed_layers = {}
            for layer in self.owner.layers.values():
                self.routed_layers.setdefault(layer.router.key, []).append(layer)
        return self.routed_layers.get(key, [])

    def aux_loss(self) -> torch.Tensor | None:
        """The weighted load-balancing loss of the routers run in this state (None when none was computed)."""
        if not self.aux_terms:
            return None
        return self.owner.config.aux_loss_coef * torch.stack(self.aux_terms).sum()

    def token_mask(self, batch: int, seq: int) -> torch.Tensor | None:
        """The attention mask of the current tokens (the last `seq` columns: earlier ones belong to the KV cache)."""
        m = self.attention_mask
        if m is None or m.dim() != 2 or m.shape[0] != batch or m.shape[1] < seq:
            return None
        return m[:, -seq:].reshape(-1)


def _find(stack: tuple, owner):
    for item in reversed(stack):
        if item[0] is owner:
            return item[1]
    return None


def active_state(owner) -> ForwardState | None:
    return _find(_ACTIVE.get(), owner)


@contextlib.contextmanager
def activate(state: ForwardState):
    token = _ACTIVE.set(_ACTIVE.get() + ((state.owner, state),))
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


def pending_embeds(owner, batch: int | None = None) -> torch.Tensor | None:
    """The z of the innermost `conditioning` of `owner`; inside generate, repeated to the `batch` rows it made."""
    item = _find(_PENDING.get(), owner)
    if item is None:
        return None
    z, per_row_copies = item
    if per_row_copies and batch is not None and batch != z.shape[0] and batch % z.shape[0] == 0:
        # generate repeats each input row consecutively (repeat_interleave) for beams and returned sequences
        return z.repeat_interleave(batch // z.shape[0], dim=0)
    return z


@contextlib.contextmanager
def conditioning(model, demographic_embeds: torch.Tensor):
    """Condition every forward (and generate) of `model` inside the block on `demographic_embeds` [batch, D].

    For code paths that cannot pass `demographic_embeds=` themselves. An explicit keyword still wins.
    """
    with _pending(_owner_of(model), demographic_embeds, per_row_copies=False):
        yield model


@contextlib.contextmanager
def _pending(owner, demographic_embeds: torch.Tensor, per_row_copies: bool):
    token = _PENDING.set(_PENDING.get() + ((owner, (demographic_embeds, per_row_copies)),))
    try:
        yield
    finally:
        _PENDING.reset(token)


@contextlib.contextmanager
def generation_conditioning(owner, demographic_embeds: torch.Tensor):
    """z for the forwards of one generate call, which may hold each row several times (beams, samples)."""
    with _pending(owner, demographic_embeds, per_row_copies=True):
        yield


@dataclass
class RoutingRecord:
    router_key: str
    topk_idx: torch.Tensor  # [batch, seq, k] int64, CPU
    topk_weights: torch.Tensor  # [batch, seq, k] float32, CPU


@dataclass
class RoutingTrace:
    records: list = field(default_factory=list)


@contextlib.contextmanager
def record_routing(model):
    """Record every routing decision of `model` made inside the block: `trace.records`, in call order."""
    owner = _owner_of(model)
    trace = RoutingTrace()
    token = _RECORDERS.set(_RECORDERS.get() + ((owner, trace),))
    try:
        yield trace
    finally:
        _RECORDERS.reset(token)


def recorder(owner) -> RoutingTrace | None:
    return _find(_RECORDERS.get(), owner)


@contextlib.contextmanager
def adapters_disabled(model):
    """Run `model` as its frozen base inside the block (e.g. as a DPO reference without a second copy)."""
    owner = _owner_of(model)
    token = _DISABLED.set(_DISABLED.get() + ((owner, True),))
    try:
        yield model
    finally:
        _DISABLED.reset(token)


def is_disabled(owner) -> bool:
    """Inside `adapters_disabled(model)`, or while the owner is switched off (PEFT's `disable_adapter()`)."""
    return getattr(owner, "disabled", False) or bool(_find(_DISABLED.get(), owner))


def wrap_checkpoint_function(checkpoint_fn):
    """Wrap a layer's checkpoint function so its backward replay sees the conditioning active at forward time."""
    if getattr(checkpoint_fn, "_cuma_replays_conditioning", False):
        return checkpoint_fn

    def checkpoint_with_conditioning(function, *args, **kwargs):
        captured = (_ACTIVE.get(), _DISABLED.get())

        def replay(*a, **k):
            t1, t2 = _ACTIVE.set(captured[0]), _DISABLED.set(captured[1])
            try:
                return function(*a, **k)
            finally:
                _ACTIVE.reset(t1)
                _DISABLED.reset(t2)

        return checkpoint_fn(replay, *args, **kwargs)

    checkpoint_with_conditioning._cuma_replays_conditioning = True
    return checkpoint_with_conditioning


def _owner_of(model):
    owner = getattr(model, "cuma", None)
    if owner is None:
        raise ValueError("this model is not patched with CuMA: call cuma_model.patch_model(model, ...) first")
    return owner
