"""DemographicRouter: the router MLP on [hidden ; z], with the z part computed once per sequence."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

import cuma_kernels
from cuma_kernels.reference import dense_gates


class DemographicStatistics(nn.Module):
    """The first thing done to z: minus the training profiles' mean, times a whitening (`demographic_norm`), times
    `demographic_scale`. The statistics are buffers, saved with the adapter and never trained; NaN until set, so
    that an adapter whose statistics were never fitted refuses to route instead of routing on raw z."""

    def _register_statistics(self, dim: int, norm: str, scale: float, device) -> None:
        self.demographic_scale = scale
        if norm != "none" and dim:
            self.register_buffer("z_mean", torch.full((dim,), float("nan"), device=device))
        if norm == "whiten" and dim:
            self.register_buffer("z_whiten", torch.eye(dim, dtype=torch.float32, device=device))

    def _check_fitted(self) -> None:
        message = ("this adapter's z statistics were never fitted (demographic_norm): call "
                   "cuma_model.fit_demographic_norm(model, z_of_the_training_profiles) before training")
        unset = torch.isnan(self.z_mean[:1])
        if self.z_mean.is_cuda or torch.compiler.is_compiling():
            torch._assert_async(~unset.squeeze(0), message)  # no host sync per call
        elif bool(unset):
            raise ValueError(message)

    def set_demographic_norm(self, mean: torch.Tensor, whiten: torch.Tensor | None = None) -> None:
        """z then becomes (z - mean) @ whiten.T (times `demographic_scale`)."""
        with torch.no_grad():
            self.z_mean.copy_(mean)
            if whiten is not None:
                self.z_whiten.copy_(whiten)

    def normalized(self, z: torch.Tensor) -> torch.Tensor:
        """z [batch, D], already in the compute dtype, after the statistics and the scale."""
        if hasattr(self, "z_mean"):
            self._check_fitted()
            z = z - self.z_mean.to(z.dtype)
        if hasattr(self, "z_whiten"):
            z = z @ self.z_whiten.to(z.dtype).T
        if self.demographic_scale != 1.0:
            z = z * self.demographic_scale
        return z


class DemographicProjection(DemographicStatistics):
    """The published encoder projection of z, run once per forward for all routers (which then take its output as
    their z): the z statistics and scale, then 1 layer, Linear(D -> D) initialised xavier-normal with gain 0.01 and
    zero bias, as published, or 2 layers, Linear(D -> D), GELU, Linear(D -> D) at torch's default initialisation.
    Like the routers it runs in at least float32 whatever the weights' dtype and any autocast."""

    def __init__(self, dim: int, num_layers: int, demographic_norm: str = "none", demographic_scale: float = 1.0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim, dtype=dtype, device=device) for _ in range(num_layers))
        if num_layers == 1:
            nn.init.xavier_normal_(self.layers[0].weight, gain=0.01)
            nn.init.zeros_(self.layers[0].bias)
        self._register_statistics(dim, demographic_norm, demographic_scale, device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [batch, D] -> [batch, D] in float32 (float64 weights: 64), on z's device."""
        dtype = torch.promote_types(self.layers[0].weight.dtype, torch.float32)
        device = z.device.type
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            h = self.normalized(z.to(self.layers[0].weight.device, dtype))
            for i, layer in enumerate(self.layers):
                if i:
                    h = F.gelu(h)
                h = F.linear(h, layer.weight.to(dtype), layer.bias.to(dtype))
        return h.to(z.device)


class DemographicRouter(DemographicStatistics):
    """Published router: Dropout -> Linear(d_in + D -> H) -> ReLU -> Dropout -> Linear(H -> E), then top-k.

    The first Linear is stored whole (its weight is [H, d_in + D], initialised like the published one), but applied
    as `W_h x + (W_z z + b)`: the z half is per sequence, so it is computed once per sequence, and the concatenation
    [x ; z] is never materialised. With dropout > 0 the z half is dropped once per sequence rather than per token.
    """

    def __init__(
        self,
        in_features: int,
        demographic_dim: int,
        num_experts: int,
        top_k: int,
        hidden_dim: int = 256,
        num_layers: int = 2,
        dropout: float = 0.0,
        mode: str = "cuma",
        demographic_scale: float = 1.0,
        demographic_norm: str = "none",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.demographic_dim = in_features, demographic_dim
        self.num_experts, self.top_k, self.mode = num_experts, top_k, mode
        self.key = ""  # qualified name, set by patch_model
        widths = [in_features + demographic_dim] + [hidden_dim] * (num_layers - 1) + [num_experts]
        self.layers = nn.ModuleList(
            nn.Linear(a, b, dtype=dtype, device=device) for a, b in zip(widths[:-1], widths[1:])
        )
        self.dropout = nn.Dropout(dropout)
        self._register_statistics(demographic_dim, demographic_norm, demographic_scale, device)

    def _check(self, x: torch.Tensor, z: torch.Tensor | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"router expects x of shape [batch, seq, {self.in_features}], got {tuple(x.shape)}")
        if self.demographic_dim == 0:
            return
        if z is None:
            raise ValueError(
                "missing conditioning: this router needs demographic_embeds of shape "
                f"[batch, {self.demographic_dim}] (pass demographic_embeds=... or use cuma_model.conditioning)"
            )
        if z.dim() != 2 or z.shape[1] != self.demographic_dim:
            raise ValueError(
                f"demographic_embeds must have shape [batch, {self.demographic_dim}], got {tuple(z.shape)}"
            )
        if z.shape[0] != x.shape[0]:
            raise ValueError(
                f"demographic_embeds has batch {z.shape[0]} but the input has batch {x.shape[0]}; expand it "
                "explicitly to the input's rows (torch.cat([z, z]) for chosen+rejected, z.repeat_interleave(n, 0) "
                "for n samples per prompt)"
            )

    def logits(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """x [batch, seq, hidden], z [batch, D] -> pre-softmax logits [batch, seq, E], float32 (float64 weights: 64).

        The MLP runs in at least float32 whatever the weights' dtype and any autocast: fp16 logits overflow into NaN
        gates, and the top-k choice is sensitive to rounding. The router is small next to the layer it routes.
        """
        self._check(x, z)
        dtype = torch.promote_types(self.layers[0].weight.dtype, torch.float32)
        device = x.device.type
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            first = self.layers[0]
            w = first.weight.to(dtype)
            h = F.linear(self.dropout(x.to(dtype)), w[:, : self.in_features])
            if self.demographic_dim:
                z = self.normalized(z.to(dtype))
                per_sequence = F.linear(self.dropout(z), w[:, self.in_features :], first.bias.to(dtype))
            else:
                per_sequence = first.bias.to(dtype)[None]
            h = h + per_sequence[:, None, :]
            for layer in self.layers[1:]:
                h = F.linear(self.dropout(F.relu(h)), layer.weight.to(dtype), layer.bias.to(dtype))
        return h

    def route(self, x: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (topk_weights [batch, seq, k] float32, topk_idx [batch, seq, k] int64)."""
        w, idx = self.route_flat(self.logits(x, z))
        return w.view(*x.shape[:2], -1), idx.long().view(*x.shape[:2], -1)

    def route_flat(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [batch, seq, E] -> flat (topk_weights [T, k] float32, topk_idx [T, k] int32)."""
        return cuma_kernels.route_topk(logits.reshape(-1, self.num_experts), self.top_k, self.mode)

    def gates(self, logits: torch.Tensor, topk_weights: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """The published dense gate matrix G [T, E]: full softmax for "soft", else the top-k weights scattered."""
        if self.mode == "soft":
            return torch.softmax(logits.reshape(-1, self.num_experts).float(), dim=-1)
        return dense_gates(topk_idx, topk_weights, self.num_experts)

    def extra_repr(self) -> str:
        scale = f", demographic_scale={self.demographic_scale}" if self.demographic_scale != 1.0 else ""
        return (f"experts={self.num_experts}, top_k={self.top_k}, mode={self.mode!r}, "
                f"demographic_dim={self.demographic_dim}{scale}")


def demographic_statistics(demographic_embeds: torch.Tensor, whiten: bool, shrinkage: float = 0.5
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean [D], whitening [D, D] or None) of the rows of `demographic_embeds` (one per distinct profile).

    Whitening is C'^(-1/2) for the rows' covariance C shrunk towards its mean eigenvalue m, C' = (1 - s) C + s m I
    (s = `shrinkage`): directions along which the profiles vary get (nearly) equal variance, and those along which
    the training profiles happen not to vary are scaled at most 1/sqrt(s) times as much as an average one, so a
    new profile that differs there is not blown up (a sentence encoder has 384 dimensions; a survey has a few
    thousand profiles, often fewer)."""
    z = demographic_embeds.detach().to(torch.float64)
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"the statistics of z need at least 2 rows of shape [N, D], got {tuple(z.shape)}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("demographic_embeds contains NaN or inf; every z must be finite")
    if not 0.0 < shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in (0, 1], got {shrinkage}")
    mean = z.mean(dim=0)
    if not whiten:
        return mean.float(), None
    centred = z - mean
    cov = centred.T @ centred / (z.shape[0] - 1)
    eigenvalues, vectors = torch.linalg.eigh(cov)
    eigenvalues = eigenvalues.clamp(min=0.0)
    average = float(eigenvalues.mean())
    if average <= 1e-12 * max(float(z.abs().max()) ** 2, 1e-30):
        raise ValueError("the rows of demographic_embeds are all alike: there is no variance to whiten")
    shrunk = (1.0 - shrinkage) * eigenvalues + shrinkage * average
    return mean.float(), (vectors @ torch.diag(shrunk.rsqrt()) @ vectors.T).float()


def load_balancing_loss(gates: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Published per-router loss E * sum_e freq_e * prop_e on the dense gates G [T, E] (balanced minimum: 1).

    freq_e: share of the top-k slots given to e (through sign(G), so it carries no gradient);
    prop_e: mean gate weight of e. `token_mask` [T] excludes padding, as the published attention-mask weighting does;
    a float mask weights each token (a token standing for w tokens counts w times).
    """
    num_experts = gates.shape[-1]
    m = gates.new_ones(gates.shape[0]) if token_mask is None else token_mask.to(gates.dtype)
    n = m.sum().clamp_min(1.0)
    gm = gates * m[:, None]
    freq = (torch.sign(gates) * m[:, None]).sum(0) / (n * top_k)
    prop = gm.sum(0) / n
    return num_experts * (freq * prop).sum()
