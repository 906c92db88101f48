"""A :class:`~flax_resnet.models.graph.Graph` as serialised StableHLO, through :mod:`jax.export`.

The artefact is ``jax.export.Exported.serialize()``: versioned StableHLO with the weights as
constants, for CPU, CUDA and TPU, taking NHWC float32 ``[batch, H, W, C]`` with a symbolic
``batch``. Any process with jax (and not this package) runs it::

    exp = jax.export.deserialize(open("model.stablehlo", "rb").read())
    logits = exp.call(images)

Serialising needs the ``flatbuffers`` package (the ``[export]`` extra).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flax_resnet.errors import UserError
from flax_resnet.models.graph import Graph, run

PLATFORMS = ("cpu", "cuda", "tpu")


def exported(graph: Graph, image_size: int, platforms=PLATFORMS) -> jax.export.Exported:
    """``graph`` exported for NHWC inputs of side ``image_size`` and any batch size."""
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, image_size, image_size, graph.in_channels), jnp.float32)
    return jax.export.export(jax.jit(lambda x: run(graph, x)), platforms=platforms)(spec)


def serialize(exp: jax.export.Exported) -> bytes:
    try:
        return bytes(exp.serialize())
    except ImportError as e:  # jax imports flatbuffers only when serialising
        raise UserError(f"StableHLO serialisation needs flatbuffers ({e}): pip install 'flax-resnet[export]'") from None
