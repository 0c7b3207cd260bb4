"""Multi-process training on CPU (gloo): DDP without find_unused_parameters, FSDP2 per decoder layer, and where\nrouters and experts live."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cuma_model
from cuma_model.patch import PROJECTION_NAME
from tiny_models import tiny_decoder

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ddp_worker  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_every_trainable_parameter_is_in_the_graph_even_for_empty_experts():
    """The CPU path multiplies dense gates, and cuma_A/cuma_B hold all experts in one tensor each: an expert that
    receives no token still gets a (zero) gradient, so DDP needs no find_unused_parameters."""
    model = ddp_worker.build(aux_loss_coef=0.01)
    ids, z = ddp_worker.batch()
    with cuma_model.record_routing(model) as trace:
        ddp_worker.loss_of(model, ids, z).backward()
    used = torch.cat([r.topk_idx.flatten() for r in trace.records]).unique().tolist()
    assert set(used) <= {0, 1}, used  # experts 2..7 received no token anywhere
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    b = model.model.layers[0].self_attn.q_proj.cuma_B.grad
    assert b[2:].abs().max() == 0 and b[:2].abs().max() > 0
    router = model.model.layers[0].self_attn.q_proj.cuma_router
    assert all(p.grad.abs().max() > 0 for p in router.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_single_process(tmp_path, mode):
    out = tmp_path / "rank0_grads.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(HERE / "ddp_worker.py"),
           "--out", str(out), "--mode", mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = torch.load(out)
    ids, z = ddp_worker.batch()
    half = ddp_worker.BATCH // 2

    # LM loss alone: the mean of the two halves' losses is the whole-batch loss (equal token counts, no padding).
    model = ddp_worker.build(aux_loss_coef=0.0)
    ddp_worker.loss_of(model, ids, z).backward()
    whole = _grads(model)
    assert whole.keys() == ddp["lm"].keys()
    for name in whole:
        torch.testing.assert_close(ddp["lm"][name], whole[name], rtol=1e-5, atol=1e-7, msg=name)

    # With the load-balancing term (not additive over halves): DDP averages the per-half gradients.
    per_half = []
    for rows in (slice(0, half), slice(half, None)):
        model = ddp_worker.build(aux_loss_coef=0.01)
        ddp_worker.loss_of(model, ids[rows], z[rows]).backward()
        per_half.append(_grads(model))
    for name in per_half[0]:
        torch.testing.assert_close(ddp["lm_aux"][name], (per_half[0][name] + per_half[1][name]) / 2,
                                   rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kw", [{}, {"target_modules": ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
                                     "shared_A": True}, {"share_router_qkv": False},
                                {"demographic_projection_layers": 2}])
def test_trainable_parameters_live_inside_their_decoder_layer(arch, kw):
    """FSDP's transformer-layer auto-wrap makes one unit per decoder layer: routers and experts must sit under
    `model.layers.<i>.` so each layer's unit owns (and gathers) its own routers and experts. The projection of z,
    which runs before every layer, is the one trainable module at the root (the root unit's)."""
    model = tiny_decoder(arch)
    cuma_model.patch_model(model, num_experts=4, top_k=2, r=2, demographic_dim=4, router_hidden_dim=8, **kw)
    layer_cls = type(model.model.layers[0])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    at_root = [n for n in trainable if n.startswith(PROJECTION_NAME + ".")]
    assert len(at_root) == (4 if kw.get("demographic_projection_layers") else 0)
    trainable = [n for n in trainable if n not in at_root]
    assert trainable
    pattern = re.compile(r"^model\.layers\.(\d+)\.")
    for name in trainable:
        m = pattern.match(name)
        assert m, f"{name} is outside every decoder layer"
        assert isinstance(model.model.layers[int(m.group(1))], layer_cls)
    # every router is owned by exactly one decoder layer (a shared router is registered once, on the first projection it serves)
    for router in cuma_model.routers(model):
        owners = [i for i, layer in enumerate(model.model.layers) if any(m is router for m in layer.modules())]
        assert len(owners) == 1, router.key


def test_example_launch_configs_parse():
    import json

    from accelerate.commands.config.config_args import load_config_from_file

    examples = HERE.parent / "examples"
    fsdp2 = load_config_from_file(str(examples / "accelerate_fsdp2.yaml"))
    assert fsdp2.distributed_type == "FSDP" and fsdp2.fsdp_config["fsdp_version"] == 2
    assert fsdp2.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == type(tiny_decoder("llama").model.layers[0]).__name__
    fsdp1 = load_config_from_file(str(examples / "accelerate_fsdp1.yaml"))
    assert fsdp1.fsdp_config["fsdp_use_orig_params"] is True
    ds = load_config_from_file(str(examples / "accelerate_deepspeed_zero2.yaml"))
    assert ds.distributed_type == "DEEPSPEED"
    zero = json.loads((HERE.parent / ds.deepspeed_config["deepspeed_config_file"]).read_text())
    assert zero["zero_optimization"]["stage"] == 2
    assert load_config_from_file(str(examples / "accelerate_ddp.yaml")).distributed_type == "MULTI_GPU"
