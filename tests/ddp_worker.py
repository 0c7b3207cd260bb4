"""One rank of the 2-process DDP / FSDP checks (launched by tests/test_distributed.py through torchrun, gloo on CPU).

Each rank takes its half of one batch (its own rows of z too), runs two forward/backward passes through a
DistributedDataParallel-wrapped CuMA model WITHOUT find_unused_parameters, with routing skewed so that some experts
receive no token, and rank 0 writes the averaged gradients of the second pass to --out.
Two losses are checked: the language-model loss alone (aux_loss_coef=0: the average of the two halves equals the
whole-batch loss exactly), and the loss with the load-balancing term (the average of the two per-half losses).
With --mode fsdp the model is sharded with FSDP2 (`fully_shard` per decoder layer, then the root), the way
accelerate's transformer-layer auto-wrap does it, and the full gradients are gathered before writing.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cuma_model  # noqa: E402
from tiny_models import randomize_experts, tiny_decoder  # noqa: E402

D = 6
BATCH, SEQ = 4, 5


def build(aux_loss_coef: float):
    """The tiny patched model, identical on every rank and in the test process."""
    model = tiny_decoder("llama", seed=0)
    cuma_model.patch_model(model, num_experts=8, top_k=1, r=2, demographic_dim=D, router_hidden_dim=8,
                           routing_mode="soft", aux_loss_coef=aux_loss_coef,
                           demographic_projection_layers=2)  # at the root: FSDP's root unit must gather it
    randomize_experts(model, std=0.3, seed=1)
    with torch.no_grad():  # skew routing: experts 0 and 1 take (nearly) every token, 2..7 none
        for router in cuma_model.routers(model):
            router.layers[-1].bias.copy_(torch.tensor([4.0, 3.5, -4.0, -4.0, -4.0, -4.0, -4.0, -4.0]))
    model.train()
    return model


def batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 97, (BATCH, SEQ), generator=g)
    z = torch.randn(BATCH, D, generator=g)
    return ids, z


def loss_of(model, ids, z):
    return model(input_ids=ids, labels=ids, demographic_embeds=z).loss


def wrap(model, mode: str):
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)  # find_unused_parameters defaults to False
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:  # one unit per decoder layer: its routers and experts shard with it
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=("ddp", "fsdp"), default="ddp")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids, z = batch()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results = {}
    for name, coef in (("lm", 0.0), ("lm_aux", 0.01)):
        model = build(coef)
        wrapped = wrap(model, args.mode)
        for _ in range(2):  # with DDP, an unused parameter would make the second forward raise
            wrapped.zero_grad(set_to_none=True)
            loss_of(wrapped, ids[rows], z[rows]).backward()
        results[name] = {n: full(p.grad).detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo's threads can hang the interpreter's own shutdown now and then (seen under load): the work is done and
    # written, so leave without it
    os._exit(0)


if __name__ == "__main__":
    main()
