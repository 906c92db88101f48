"""What ``flax-resnet models`` prints: parameter counts and forward FLOPs counted from the layers' shapes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from flax_resnet.models.registry import create_model, get_spec, list_models


def count_params(model: nnx.Module) -> int:
    """Trainable parameters (``nnx.Param``), not BatchNorm running statistics."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _eqn_flops(eqn) -> int:
    """2 x the multiply-adds of one convolution (over the full padded window) or matmul."""
    name = eqn.primitive.name
    if name == "conv_general_dilated":
        rhs, out = eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
        _, in_dim, *spatial = eqn.params["dimension_numbers"].rhs_spec
        return 2 * math.prod(out) * rhs[in_dim] * math.prod(rhs[d] for d in spatial)
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    return 0


def _jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    total += _jaxpr_flops(inner)
    return total


def model_flops(model: nnx.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs of ``model`` (eval mode) on one input of ``input_shape`` (NHWC, batch included).

    2 x the multiply-adds of every convolution and linear layer, read off the traced
    program's shapes (nothing is compiled or allocated); BatchNorm, activations, pools and
    additions are not counted, as in torchvision's and the papers' figures.
    """
    graphdef, state = nnx.split(model)

    def forward(state, x):
        m = nnx.merge(graphdef, state)
        m.eval()
        return m(x)

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    jaxpr = jax.make_jaxpr(forward)(abstract, jax.ShapeDtypeStruct(input_shape, jnp.float32))
    return _jaxpr_flops(jaxpr.jaxpr)


def forward_flops(name: str, input_size: int | None = None, in_channels: int = 3) -> float:
    """Forward FLOPs of registered model ``name`` for one image at ``input_size`` (default: the model's).

    A multiply-add counts as 2 FLOPs: ResNet-50 at 224 is 8.18 GFLOPs (torchvision's
    "4.09 GFLOPS" are multiply-adds), CIFAR ResNet-20 at 32 is 0.081.
    """
    size = input_size or get_spec(name).input_size
    abstract = nnx.eval_shape(lambda: create_model(name, in_channels=in_channels))
    return float(model_flops(abstract, (1, size, size, in_channels)))


def format_model_table(name_filter: str = "", with_flops: bool = True) -> str:
    """The table printed by ``flax-resnet models``."""
    rows = [("model", "params", "input", "GFLOPs", "description")]
    for name in list_models(name_filter or None):
        spec = get_spec(name)
        model = nnx.eval_shape(lambda: create_model(name))
        flops = f"{model_flops(model, (1, spec.input_size, spec.input_size, 3)) / 1e9:.3f}" if with_flops else "-"
        rows.append((name, f"{count_params(model):,}", f"{spec.input_size}", flops, spec.description))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].rjust(widths[2]),
                        r[3].rjust(widths[3]), r[4]]) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"{len(rows) - 1} models. GFLOPs: forward pass of one image at the input size, "
                 "2 x the multiply-adds of every convolution and linear layer.")
    return "\n".join(lines)
