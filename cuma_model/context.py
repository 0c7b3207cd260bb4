"""How z reaches the routers: a per-forward state in a per-thread stack, never on modules or classes.

A patched model's forward pushes a `ForwardState` (z, attention mask, the routes computed so far, aux terms) for the
duration of the call; every CuMALinear of that model looks it up by its owner. Gradient-checkpointed layers replay
their forward during backward, after the call returned: `wrap_checkpoint_function` captures the active states when
the layer runs and re-activates them for the replay, so recomputation routes with the same z.

The stacks live in a `threading.local`: threads keep their conditioning apart, and torch.compile traces reads and
writes of it (it cannot trace context variables), so a compiled forward, z and all, is one graph. A `conditioning`
block opened with `share_with_threads=True` also reaches threads that have none of their own while it is open (the
streaming recipe: `generate` in a worker thread, the block around it), as long as it is the model's only shared
block in the process; with shared blocks open in several threads, a thread without its own is refused rather than
given a guess. Sharing is asked for, never the default: a server thread that forgot its z must be refused, not
routed with another request's. A block is per thread, not per asyncio task: do not hold one open across an
`await` that lets another task run the same model.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch


class _Stacks(threading.local):
    """Per thread: (owner, item) pairs, innermost last, for each kind of conditioning."""

    def __init__(self):
        self.active: tuple = ()  # (owner, ForwardState)
        self.pending: tuple = ()  # (owner, (z, per_row_copies))
        self.recorders: tuple = ()  # (owner, RoutingTrace)
        self.disabled: tuple = ()  # (owner, True)


_STACKS = _Stacks()
_OPEN_BLOCKS: list = []  # (owner, z, thread id) of every open `conditioning(..., share_with_threads=True)`
_OPEN_BLOCKS_LOCK = threading.Lock()


@contextlib.contextmanager
def _pushed(kind: str, owner, item):
    previous = getattr(_STACKS, kind)
    setattr(_STACKS, kind, previous + ((owner, item),))
    try:
        yield item
    finally:
        setattr(_STACKS, kind, previous)


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
    routes: dict = field(default_factory=dict)  # router key -> (x, Route, siblings yet to take it)
    token_shape: tuple | None = None  # (batch, seq) of the call, from the first [batch, seq, hidden] input seen
    aux_terms: list = field(default_factory=list)
    routed_layers: dict | None = None  # router key -> the owner's layers it routes, in patching order (on first use)

    def cached_route(self, key: str, x: torch.Tensor) -> Route | None:
        hit = self.routes.get(key)
        if hit is None or hit[0] is not x:
            return None
        _, route, left = hit
        if left > 1:
            self.routes[key] = (x, route, left - 1)
        else:  # every sibling has it: let go of x
            del self.routes[key]
        return route

    def store_route(self, key: str, x: torch.Tensor, route: Route) -> None:
        """Keep the route for the siblings routed by `key` that have yet to see x. x itself is held, not a weak
        reference (torch.compile cannot trace those), and only until the last sibling took the route."""
        left = len(self.layers_routed_by(key)) - 1
        if left > 0:
            self.routes[key] = (x, route, left)

    def layers_routed_by(self, key: str) -> list:
        """The adapted layers of this state's model that the router `key` routes (q/k/v or gate/up siblings)."""
        if self.routed_layers is None:
            self.routed_layers = {}
            for layer in self.owner.layers.values():
                self.routed_layers.setdefault(layer.cuma_router.key, []).append(layer)
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
    return _find(_STACKS.active, owner)


def activate(state: ForwardState):
    return _pushed("active", state.owner, state)


def pending_embeds(owner, batch: int | None = None) -> torch.Tensor | None:
    """The z of the innermost `conditioning` of `owner`; inside generate, repeated to the `batch` rows it made."""
    item = _find(_STACKS.pending, owner)
    if item is None:
        return _open_block_elsewhere(owner)
    z, per_row_copies = item
    if per_row_copies and batch is not None and batch != z.shape[0] and batch % z.shape[0] == 0:
        # generate repeats each input row consecutively (repeat_interleave) for beams and returned sequences
        return z.repeat_interleave(batch // z.shape[0], dim=0)
    return z


@contextlib.contextmanager
def conditioning(model, demographic_embeds: torch.Tensor, share_with_threads: bool = False):
    """Condition every forward (and generate) of `model` inside the block on `demographic_embeds` [batch, D].

    For code paths that cannot pass `demographic_embeds=` themselves. An explicit keyword still wins. With
    `share_with_threads`, threads with no block of their own see this one while it is open (a worker thread
    running `generate` for a streamer), unless shared blocks of the model are open in several threads.
    """
    owner = _owner_of(model)
    entry = (owner, demographic_embeds, threading.get_ident())
    if share_with_threads:
        with _OPEN_BLOCKS_LOCK:
            _OPEN_BLOCKS.append(entry)
    try:
        with _pending(owner, demographic_embeds, per_row_copies=False):
            yield model
    finally:
        if share_with_threads:
            with _OPEN_BLOCKS_LOCK:  # by identity: comparing entries would compare their tensors
                del _OPEN_BLOCKS[next(i for i, e in enumerate(_OPEN_BLOCKS) if e is entry)]


def _open_block_elsewhere(owner) -> torch.Tensor | None:
    """The z of the one shared `conditioning` block of `owner` open in another thread (a worker started in it)."""
    if not _OPEN_BLOCKS:  # the common case, read without the lock
        return None
    with _OPEN_BLOCKS_LOCK:
        blocks = [(z, thread) for o, z, thread in _OPEN_BLOCKS if o is owner]
    if len({thread for _, thread in blocks}) > 1:
        raise ValueError("shared conditioning blocks of this model are open in several threads, and this thread "
                         "has none of its own: pass demographic_embeds=z to the call (or open the block in this "
                         "thread)")
    return blocks[-1][0] if blocks else None


def _pending(owner, demographic_embeds: torch.Tensor, per_row_copies: bool):
    return _pushed("pending", owner, (demographic_embeds, per_row_copies))


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
    with _pushed("recorders", _owner_of(model), RoutingTrace()) as trace:
        yield trace


def recorder(owner) -> RoutingTrace | None:
    return _find(_STACKS.recorders, owner)


@contextlib.contextmanager
def adapters_disabled(model):
    """Run `model` as its frozen base inside the block (e.g. as a DPO reference without a second copy)."""
    with _pushed("disabled", _owner_of(model), True):
        yield model


def is_disabled(owner) -> bool:
    """Inside `adapters_disabled(model)`, or while the owner is switched off (PEFT's `disable_adapter()`)."""
    return getattr(owner, "disabled", False) or bool(_find(_STACKS.disabled, owner))


def wrap_checkpoint_function(checkpoint_fn):
    """Wrap a layer's checkpoint function so its backward replay sees the conditioning active at forward time.

    The load-balancing terms of the layer's routers leave the checkpoint as extra outputs of the checkpointed
    function, not through the state: a reentrant checkpoint runs the layer under no_grad, so terms collected inside
    it would carry no gradient; as outputs they get one, and the replay backpropagates into the routers.
    """
    if getattr(checkpoint_fn, "_cuma_replays_conditioning", False):
        return checkpoint_fn

    def checkpoint_with_conditioning(function, *args, **kwargs):
        captured = (_STACKS.active, _STACKS.disabled)
        states = [state for _, state in captured[0] if state.compute_aux]
        layout = {}  # set by the first run: whether the terms rode out as outputs, and the output's form

        def replay(*a, **k):
            previous = (_STACKS.active, _STACKS.disabled)
            _STACKS.active, _STACKS.disabled = captured
            marks = [len(state.aux_terms) for state in states]
            try:
                out = function(*a, **k)
            finally:
                _STACKS.active, _STACKS.disabled = previous
            plain = type(out) is tuple or isinstance(out, torch.Tensor)
            layout.setdefault("extra", bool(states) and plain)
            layout.setdefault("tuple", type(out) is tuple)
            if not layout["extra"]:
                return out
            sums = []
            for state, mark in zip(states, marks):
                terms = state.aux_terms[mark:]
                del state.aux_terms[mark:]
                sums.append(torch.stack(terms).sum() if terms else None)
            return (*out, *sums) if layout["tuple"] else (out, *sums)

        result = checkpoint_fn(replay, *args, **kwargs)
        if not layout.get("extra"):
            return result
        out, sums = result[:-len(states)], result[-len(states):]
        for state, total in zip(states, sums):
            if total is not None:
                state.aux_terms.append(total)
        return tuple(out) if layout["tuple"] else out[0]

    checkpoint_with_conditioning._cuma_replays_conditioning = True
    return checkpoint_with_conditioning


def _owner_of(model):
    owner = getattr(model, "cuma", None)
    if owner is None:
        raise ValueError("this model is not patched with CuMA: call cuma_model.patch_model(model, ...) first")
    return owner
