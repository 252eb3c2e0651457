"""smoe.distributed.ExpertParallelMoE: smoe.nn.MoE with its routed experts sharded over an EP group.

Forward on each rank (docs/distributed.md): route the local tokens with the full router; routing_plan
over all E experts (experts of rank p are the contiguous block [p*E/P, (p+1)*E/P), so the expert-sorted
rows are already rank-major); exchange the per-(rank, expert) counts; permute and send the rows with
uneven splits; the received rows are rank-major, and a local routing plan over them (expert-major,
source rank order inside an expert = global token order) feeds expert_mlp with the local w1/w2
shards; rows go back the same way and combine runs on the rows of the local plan. Backward runs the
same exchanges in reverse (comm.all_to_all_single).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from smoe.distributed.comm import all_to_all_single, comm_device
from smoe.nn.moe import MoE
from smoe.reference.ops import RoutingPlan

__all__ = ["ExpertParallelMoE", "local_routing_plan"]

# Fields every rank of the EP group must agree on (checked by one all_gather at construction).
_CONFIG_FIELDS = (
    "hidden_size",
    "ffn_size",
    "num_experts",
    "top_k",
    "activation",
    "score_func",
    "n_groups",
    "topk_groups",
    "num_shared_experts",
    "shared_ffn_size",
    "capacity_factor",
    "dtype",
    "device type",
)


def local_routing_plan(recv_counts: torch.Tensor, device=None) -> RoutingPlan:
    """The plan of rows received rank-major: recv_counts [P, El] (row p: the rows rank p sent for each
    local expert, in that order). Rows are ordered expert-major, source rank order inside an expert,
    so an expert's segment is its rows in global token order. row_of is [N, 1] (received row -> row)."""
    cnt = recv_counts.detach().to("cpu", torch.int64)
    P, El = cnt.shape
    n = int(cnt.sum())
    flat = cnt.reshape(-1)
    start = (torch.cumsum(flat, 0) - flat).view(P, El)  # first received row of (source p, expert e)
    seg_start, seg_len = start.t().reshape(-1), cnt.t().reshape(-1)  # segments in (expert, source) order
    out_start = torch.cumsum(seg_len, 0) - seg_len
    token_of_row = torch.arange(n, dtype=torch.int64) + torch.repeat_interleave(seg_start - out_start, seg_len)
    row_of = torch.empty(n, dtype=torch.int64)
    row_of[token_of_row] = torch.arange(n, dtype=torch.int64)
    counts = cnt.sum(0)
    offsets = torch.zeros(El + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    dev = torch.device("cpu") if device is None else device
    return RoutingPlan(
        counts.to(dev, torch.int32),
        offsets.to(dev),
        row_of.view(n, 1).to(dev, torch.int32),
        token_of_row.to(dev, torch.int32),
    )


def _code(value) -> int:
    if value is None:
        return -1
    if isinstance(value, float):
        return int(round(value * 1_000_000))
    if isinstance(value, int):
        return value
    return sum(ord(c) * 131**i for i, c in enumerate(str(value))) % (2**61)


class ExpertParallelMoE(MoE):
    """smoe.nn.MoE whose routed experts are sharded over the ranks of `ep_group` (default: the world).

    Rank p of a group of size P holds experts [p*E/P, (p+1)*E/P): `w1 [E/P, F1, H]`, `w2 [E/P, H, F]`.
    The router, the balancing bias and the shared experts are replicated (each rank runs its shared
    experts on its own tokens). Built with the same seed on every rank, the layer holds exactly the
    shards of `MoE(...)` built with that seed; `from_dense(layer)` copies an existing MoE.

    Args: those of smoe.nn.MoE (expert_choice and backend="reference" are not supported), plus
        ep_group: the expert-parallel process group (None: the default group).
        ep_size: if given, the group must have this size.
        stats_group: the group over which routing statistics (last_stats, the balancing bias update in
            end_step, the aux and z losses) are reduced; default ep_group (process_group= is accepted as
            its other name: it becomes smoe.nn.MoE's process_group). Pass the whole EP x DP group so that
            the balancing bias stays identical on every replica.

    Capacity (capacity_factor) is per rank: each rank applies C = ceil(cf * T_local * K / E) to its own
    tokens before sending them (the single-process layer applied to each rank's batch).
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_size: int,
        num_experts: int,
        top_k: int,
        *,
        ep_group=None,
        ep_size: Optional[int] = None,
        stats_group=None,
        **kwargs,
    ):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ExpertParallelMoE needs torch.distributed to be initialized (init_process_group)")
        group = dist.group.WORLD if ep_group is None else ep_group
        P, rank = dist.get_world_size(group), dist.get_rank(group)
        if rank < 0:
            raise ValueError("ep_group must be a process group that contains this rank")
        # process_group (smoe.nn.MoE's count reductions: bias balancing in end_step, the "global" balance
        # loss) is the statistics group.
        stats = kwargs.pop("process_group", None) if stats_group is None else stats_group
        stats = group if stats is None else stats
        err = None
        try:
            if kwargs.get("backend", "auto") == "reference":
                raise ValueError(
                    "backend must not be 'reference' for ExpertParallelMoE (the reference layer is "
                    "single-process), got 'reference'"
                )
            if kwargs.get("expert_choice", False):
                raise ValueError("expert_choice=True is not supported by ExpertParallelMoE, got True")
            if kwargs.get("aux_loss_type", "switch") != "switch":
                raise ValueError(
                    "aux_loss_type must be 'switch' for ExpertParallelMoE (its balance loss already "
                    f"uses the counts of stats_group), got {kwargs['aux_loss_type']!r}"
                )
            if ep_size is not None and ep_size != P:
                raise ValueError(f"ep_group must have ep_size={ep_size} ranks, got a group of {P} ranks")
            super().__init__(hidden_size, ffn_size, num_experts, top_k, process_group=stats, **kwargs)
        except (ValueError, TypeError) as e:
            err = e
            nn.Module.__init__(self)
        # One all_gather of the configuration, made whether or not construction failed here, so that
        # every rank raises instead of some waiting for the others.
        if err is None:
            vals = [
                hidden_size,
                ffn_size,
                num_experts,
                top_k,
                self.activation,
                self.score_func,
                self.n_groups,
                self.topk_groups,
                self.num_shared_experts,
                self.shared_ffn_size,
                self.capacity_factor,
                str(self.w1.dtype),
                self.w1.device.type,
            ]
        else:
            vals = [0] * len(_CONFIG_FIELDS)
        dev = comm_device(group)
        mine = torch.tensor([1 if err is not None else 0] + [_code(v) for v in vals], dtype=torch.int64, device=dev)
        everyone = [torch.empty_like(mine) for _ in range(P)]
        dist.all_gather(everyone, mine, group=group)
        table = torch.stack(everyone).cpu()
        if err is not None:
            raise err
        failed = [p for p in range(P) if table[p, 0] != 0]
        if failed:
            raise ValueError(
                f"ExpertParallelMoE: rank(s) {failed} of the EP group rejected their arguments "
                "(see the error raised there)"
            )
        for i, name in enumerate(_CONFIG_FIELDS):
            col = table[:, i + 1]
            if not bool((col == col[0]).all()):
                shown = "" if name in ("activation", "score_func", "dtype", "device type") else f": {col.tolist()}"
                raise ValueError(
                    f"ExpertParallelMoE: the ranks of the EP group disagree on {name}{shown} "
                    f"(this rank: {vals[i]!r}); every rank must build the same layer"
                )
        if num_experts % P != 0:
            raise ValueError(
                f"num_experts ({num_experts}) must be divisible by the EP group size, got a group of {P} ranks"
            )
        if dev.type != self.w1.device.type:
            raise ValueError(
                f"device: the EP group's backend ({dist.get_backend(group)}) needs parameters on "
                f"{dev.type}, got {self.w1.device}"
            )

        self.ep_group, self.ep_size, self.ep_rank = group, P, rank
        self.stats_group = self.process_group
        self.num_local_experts = num_experts // P
        lo = rank * self.num_local_experts
        with torch.no_grad():
            self.w1 = nn.Parameter(self.w1[lo : lo + self.num_local_experts].clone())
            self.w2 = nn.Parameter(self.w2[lo : lo + self.num_local_experts].clone())
        for w in (self.w1, self.w2):
            w._smoe_expert_shard = True  # gradients reduced over DP replicas only (all_reduce_gradients)

    @property
    def local_experts(self) -> range:
        """Global indices of the experts this rank holds."""
        lo = self.ep_rank * self.num_local_experts
        return range(lo, lo + self.num_local_experts)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()

    @classmethod
    def from_dense(cls, layer: MoE, *, ep_group=None, **kwargs) -> ExpertParallelMoE:
        """An ExpertParallelMoE with `layer`'s configuration and weights (this rank's shard of w1/w2)."""
        cfg = dict(
            activation=layer.activation,
            score_func=layer.score_func,
            renormalize=layer.renormalize,
            renorm_eps=layer.renorm_eps,
            routed_scaling=layer.routed_scaling,
            n_groups=layer.n_groups,
            topk_groups=layer.topk_groups,
            group_score=layer.group_score,
            bias_balancing=layer.bias_balancing,
            bias_update_rate=layer.bias_update_rate,
            num_shared_experts=layer.num_shared_experts,
            shared_ffn_size=layer.shared_ffn_size if layer.num_shared_experts else None,
            shared_gate=layer.shared_gate_w is not None,
            capacity_factor=layer.capacity_factor,
            drop_policy=layer.drop_policy,
            aux_loss_coef=layer.aux_loss_coef,
            z_loss_coef=layer.z_loss_coef,
            aux_loss_mode=layer.aux_loss_mode,
            router_jitter_noise=layer.router_jitter_noise,
            router_dtype=layer.router_dtype,
            dtype=layer.w1.dtype,
            device=layer.w1.device,
            backend=layer.backend if layer.backend != "reference" else "auto",
        )
        cfg.update(kwargs)
        ep = cls(layer.hidden_size, layer.ffn_size, layer.num_experts, layer.top_k, ep_group=ep_group, **cfg)
        ep.load_dense_state(layer)
        return ep

    @torch.no_grad()
    def load_dense_state(self, layer: MoE) -> None:
        """Copy a single-process MoE's weights: router, balancing bias and shared experts whole, w1/w2 sliced."""
        lo, hi = self.local_experts.start, self.local_experts.stop
        self.router.weight.copy_(layer.router.weight)
        self.w1.copy_(layer.w1[lo:hi])
        self.w2.copy_(layer.w2[lo:hi])
        for name in ("shared_w1", "shared_w2", "shared_gate_w", "expert_bias"):
            mine = getattr(self, name)
            if mine is not None:
                mine.copy_(getattr(layer, name))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ep_size={self.ep_size}, ep_rank={self.ep_rank}"

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """smoe.nn.MoE's forward; afterwards last_stats, last_aux_loss and last_z_loss are the values over
        stats_group. Input that is bad on one rank makes every rank raise."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        err = None
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            err = f"x must have shape [..., hidden_size={self.hidden_size}], got {tuple(x.shape)}"
        elif x.device != self.w1.device:
            err = f"x must be on the device of the layer's parameters ({self.w1.device}), got {x.device}"
        elif x.dtype != self.w1.dtype and not (x.dtype.is_floating_point and torch.is_autocast_enabled(x.device.type)):
            err = f"x must have the dtype of the expert weights ({self.w1.dtype}), got {x.dtype}"
        if err is not None:
            # Take part in the count exchange with an error flag: the other ranks raise too.
            self._exchange_counts(torch.zeros(self.ep_size, self.num_local_experts, dtype=torch.int64), err)
        self._global = None
        y = super().forward(x, token_mask=token_mask)
        if self._global is not None and self.last_stats is self._global[0]["local"]:
            self.last_stats = self._global[0]["global"]
            self.last_aux_loss, self.last_z_loss = self._global[1]
        return y

    def _exchange_counts(self, send: torch.Tensor, err: Optional[str] = None) -> torch.Tensor:
        """send [P, El] -> recv [P, El] (CPU int64) by one all_to_all; a column of error flags rides along."""
        P = self.ep_size
        dev = comm_device(self.ep_group)
        flag = torch.full((P, 1), 1 if err is not None else 0, dtype=torch.int64)
        buf = torch.cat([send.to("cpu", torch.int64), flag], 1).to(dev)
        out = torch.empty_like(buf)
        dist.all_to_all_single(out, buf, group=self.ep_group)
        out = out.cpu()
        if err is not None:
            raise ValueError(err)
        bad = [p for p in range(P) if out[p, -1] != 0]
        if bad:
            raise ValueError(
                f"ExpertParallelMoE: rank(s) {bad} of the EP group got bad input to forward "
                "(see the error raised there)"
            )
        return out[:, :-1]

    def _routed_experts(self, x2, weights, experts, w1, w2):
        """Dispatch to the experts' owners, run the local experts, return (see the module docstring)."""
        import smoe.functional as F

        backend = self.backend
        T, E, P, El = x2.shape[0], self.num_experts, self.ep_size, self.num_local_experts
        plan = F.routing_plan(
            experts,
            num_experts=E,
            weights=weights.detach(),
            capacity=self.capacity(T),
            drop_policy=self.drop_policy,
            backend=backend,
        )  # capacity per rank
        send = plan.counts.view(P, El)
        recv = self._exchange_counts(send)  # [P, El] CPU
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        r_send = sum(send_splits)
        # Dispatch: rows of the plan are expert-sorted, hence rank-major.
        xs = F.permute(x2, plan, backend=backend)  # [R_max, H]
        if xs.shape[0] != r_send:
            xs = xs[:r_send]
        xr = all_to_all_single(xs, recv_splits, send_splits, self.ep_group)  # [N, H] rank-major
        lplan = local_routing_plan(recv, device=x2.device)
        ys = F.expert_mlp(xr, w1, w2, lplan, activation=self.activation, backend=backend)  # [N, H]
        yr = ys.index_select(0, lplan.row_of.view(-1).long())  # back to received order
        yb = all_to_all_single(yr, send_splits, recv_splits, self.ep_group)  # [R_send, H]: the plan's rows
        y = F.combine(yb, weights, plan, backend=backend)  # [T, H]
        return y, plan.counts

    def _forward_smoe(self, x2, router_x, ws):
        y, _switch, z, stats, scores, experts = super()._forward_smoe(x2, router_x, ws)
        T, E, dev = x2.shape[0], self.num_experts, x2.device
        # Statistics over stats_group: [routed E | kept E | T] in one all_reduce.
        sdev = comm_device(self.process_group)
        packed = torch.cat(
            [
                stats["routed_per_expert"].to(torch.int64),
                stats["tokens_per_expert"].to(torch.int64),
                torch.tensor([T], dtype=torch.int64, device=dev),
            ]
        ).to(sdev)
        dist.all_reduce(packed, group=self.process_group)
        packed = packed.to(dev)
        routed_g, kept_g, t_g = packed[:E], packed[E : 2 * E], packed[2 * E]
        denom = torch.clamp(t_g, min=1).to(torch.float32)
        # This rank's shares of the losses of the whole group's batch: summed over the ranks they are the
        # single-process losses on the concatenated batch, and so are their gradients (docs/distributed.md).
        aux = E * (routed_g.to(torch.float32) * scores.sum(0)).sum() / (denom * denom)
        z = z * (T / denom)
        shares = torch.stack([aux.detach(), z.detach()]).to(sdev)
        dist.all_reduce(shares, group=self.process_group)
        shares = shares.to(dev)
        glob = {
            "tokens_per_expert": kept_g.to(torch.int32),
            "routed_per_expert": routed_g.to(torch.int32),
            "dropped": routed_g.sum() - kept_g.sum(),
        }
        self._global = ({"local": stats, "global": glob}, (shares[0], shares[1]))
        return y, aux, z, stats, scores, experts
