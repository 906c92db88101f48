"""Probes of numerics: how well conditioned a gradient is, where ReLU kinks sit, bfloat16's gap."""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_resnet import cpu
from flax_resnet.benchmark import torch_twin
from flax_resnet.models import create_model
from flax_resnet.training import split_model


def conditioning(args) -> None:
    jax.config.update("jax_enable_x64", True)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.batch, args.size, args.size, 3)), jnp.float32)
    noise = 1e-6 * rng.normal(size=x.shape)

    def rel(a, b):  # worst difference relative to each leaf's largest entry
        return max(jax.tree.leaves(jax.tree.map(
            lambda u, w: float(jnp.max(jnp.abs(u - w)) / (jnp.max(jnp.abs(w)) + 1e-30)), a, b)))

    for name, make in (("plain", create_model), ("CPU backend", cpu.create_model)):
        graph, params, stats = split_model(make(args.model, num_classes=10))

        def loss(params, stats, x):
            y = graph.apply(params, stats, x, train=True)[0]
            return jnp.sum(y * jnp.cos(y))

        grad = jax.grad(loss)
        p64, s64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, stats))
        ref = jax.jit(grad)(p64, s64, x.astype(jnp.float64))
        noisy = jax.jit(grad)(p64, s64, x.astype(jnp.float64) + noise)
        default = jax.jit(grad)(params, stats, x)
        own_convs = jax.jit(grad, compiler_options=cpu.COMPILER_OPTIONS)(params, stats, x)
        print(f"{args.model} b{args.batch} {args.size}x{args.size} {name}: float64 sensitivity to 1e-6 "
              f"input noise {rel(noisy, ref):.1e}; float32 error vs float64: XLA's defaults {rel(default, ref):.1e}, "
              f"our compiler options {rel(own_convs, ref):.1e}", flush=True)
    kinks = relu_kinks(graph, p64, s64, x.astype(jnp.float64))  # the same parameters for both paths
    print("ReLU inputs nearest zero in float64, per ReLU in forward order (HxW:channels min|input|): "
          + " ".join(f"{h}x{w}:{c} {m:.0e}" for (h, w, c), m in kinks), flush=True)
    print(f"bfloat16 compute vs float32, gradient relative L2: {_bf16_gap(args.model, x)}", flush=True)


def _bf16_gap(model: str, x) -> str:
    """Relative L2 distance of the bfloat16-compute gradient from float32's, with ReLU and with GELU;
    for ReLU also through the CPU backend's layers (what ``half_precision`` trains with on CPU:
    oneDNN's bfloat16 convolutions where it is installed), each against its own float32."""
    def grad(act, dtype, make=create_model, jit=jax.jit):
        graph, params, stats = split_model(make(model, num_classes=10, dtype=dtype))

        def loss(params):
            y = graph.apply(params, stats, x, train=True)[0].astype("float32")
            return (y * jnp.cos(y)).sum()

        with mock.patch.object(nnx, "relu", act):
            g = jit(jax.grad(loss))(params)
        return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(g)]), params, stats

    out = []
    for name, act in (("ReLU", nnx.relu), ("GELU", jax.nn.gelu)):
        (g32, params, stats), (g16, _, _) = grad(act, "float32"), grad(act, "bfloat16")
        out.append(f"{name} {np.linalg.norm(g16 - g32) / np.linalg.norm(g32):.4f}")
        if name == "ReLU":
            (c32, _, _), (c16, _, _) = (grad(act, d, cpu.create_model, cpu.jit) for d in ("float32", "bfloat16"))
            out.append(f"CPU backend (ReLU) {np.linalg.norm(c16 - c32) / np.linalg.norm(c32):.4f}")
        if name == "ReLU":
            try:  # the same float32 weights in PyTorch
                out.append(f"PyTorch autocast(bfloat16) on the same weights (ReLU) "
                           f"{_torch_bf16_gap(model, params, stats, x):.4f}")
            except ImportError:
                pass
    return ", ".join(out)


def _torch_bf16_gap(model: str, params, stats, x) -> float:
    import torch

    grads = []
    for autocast in (False, True):
        net = torch_twin.create_torch_model(model, 10, 3)
        torch_twin.load_flax_weights(net, params, stats)
        net.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = net(torch.from_numpy(np.asarray(x, np.float32)).permute(0, 3, 1, 2).contiguous()).float()
        (y * torch.cos(y)).sum().backward()
        grads.append(torch.cat([p.grad.double().flatten() for p in net.parameters()]))
    return float((grads[1] - grads[0]).norm() / grads[0].norm())


def relu_kinks(graph, params, stats, x) -> list[tuple[tuple[int, int, int], float]]:
    """Each ReLU's input nearest zero in a train-mode forward (run eagerly, in the inputs' dtype).

    A ReLU net's gradient jumps where a pre-activation crosses zero, so a pre-activation within
    float32 rounding (~1e-6) of zero makes float32 gradients legitimately differ between
    compiles; input noise (the sensitivity above) rarely lands on such a unit, this finds them.
    """
    found, relu = [], nnx.relu

    def recording(v):
        found.append(((v.shape[1], v.shape[2], v.shape[3]), float(jnp.min(jnp.abs(v)))))
        return relu(v)

    with mock.patch.object(nnx, "relu", recording):
        graph.apply(params, stats, x, train=True)
    if not found:
        raise RuntimeError("no ReLU went through flax.nnx.relu: the models no longer call it, update this probe")
    return found
