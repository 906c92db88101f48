"""The training state: a plain pytree of arrays, plus the model's static graph.

An NNX model is split once, at creation, into

* a static :class:`ModelGraph` (two ``nnx.GraphDef``: train mode and eval mode), closed
  over by the jitted steps and never walked per step, and
* a :class:`TrainState` pytree of pure dicts/arrays (params, BatchNorm statistics,
  optimiser state, step, base RNG key) that is jitted, donated, sharded and checkpointed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flax_resnet import parallel

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as arrays.

    Attributes:
      step: number of optimiser updates done (int32 scalar).
      params: ``nnx.Param`` values as a nested dict (conv/linear ``kernel``/``bias``, BN ``scale``/``bias``).
      batch_stats: ``nnx.BatchStat`` values (BatchNorm running ``mean``/``var``).
      opt_state: the optax state.
      rng: base PRNG key (raw ``uint32[2]``); per-step keys are ``fold_in(rng, step)``.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class ModelGraph:
    """The static half of a split NNX model: one graph per BatchNorm mode."""

    train_graph: nnx.GraphDef
    eval_graph: nnx.GraphDef

    def apply(self, params, batch_stats, x, *, train: bool):
        """Runs the model functionally. Returns ``(logits, new_batch_stats)``.

        In train mode BatchNorm normalises with (global) batch statistics and the returned
        running statistics are updated; in eval mode they come back unchanged.
        """
        model = nnx.merge(self.train_graph if train else self.eval_graph, params, batch_stats)
        logits = model(x)
        new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)) if train else batch_stats
        return logits, new_stats


def compute_dtype(config) -> Any:
    """``bfloat16`` when ``config.half_precision``, else ``float32`` (params always float32)."""
    return jnp.bfloat16 if config.get("half_precision", False) else jnp.float32


def create_model(config, num_classes: int, in_channels: int, *, seed: int | None = None) -> nnx.Module:
    """The NNX model a config names (``config.model``), built through the model registry."""
    from flax_resnet.models import create_model as _create

    kwargs = dict(config.get("model_kwargs", {}) or {})
    if config.get("zero_init_residual", False):
        kwargs["zero_init_residual"] = True
    return _create(
        config.model,
        num_classes=num_classes,
        in_channels=in_channels,
        rngs=nnx.Rngs(config.seed if seed is None else seed),
        dtype=compute_dtype(config),
        param_dtype=jnp.float32,
        **kwargs,
    )


def split_model(model: nnx.Module) -> tuple[ModelGraph, PyTree, PyTree]:
    """Splits a model into ``(ModelGraph, params, batch_stats)`` with pure-dict states."""
    train_graph, params, batch_stats, rest = nnx.split(
        nnx.view(model, use_running_average=False, raise_if_not_found=False),
        nnx.Param, nnx.BatchStat, ...,
    )
    if jax.tree.leaves(rest):
        raise ValueError(
            f"model holds state other than nnx.Param/nnx.BatchStat, which training does not carry: {rest}"
        )
    eval_graph = nnx.graphdef(nnx.view(model, use_running_average=True, raise_if_not_found=False))
    return ModelGraph(train_graph, eval_graph), nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)


def weight_decay_mask(params: PyTree) -> PyTree:
    """``True`` for conv/linear kernels (path ends in ``kernel``), ``False`` for every bias and BN scale/bias."""

    def is_kernel(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", last))
        return name == "kernel"

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def create_optimizer(config, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum and L2 weight decay on kernels only.

    ``add_decayed_weights`` before ``sgd`` adds ``wd * w`` to the gradient, i.e. the
    paper's L2 regularisation ``wd/2 * ||w||^2`` (as PyTorch's ``SGD(weight_decay=...)``).
    """
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
        optax.sgd(learning_rate_fn, momentum=config.momentum or None, nesterov=config.nesterov),
    )


def init_train_state(
    config, num_classes: int, in_channels: int, tx: optax.GradientTransformation
) -> tuple[TrainState, ModelGraph]:
    """A fresh state (on the default device) and the model's static graph."""
    graph, params, batch_stats = split_model(create_model(config, num_classes, in_channels))
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(config.seed),
    )
    return state, graph


def create_train_state(
    config, num_classes: int, in_channels: int, tx: optax.GradientTransformation, mesh
) -> tuple[TrainState, ModelGraph]:
    """A fresh state replicated over ``mesh``, and the model's static graph."""
    state, graph = init_train_state(config, num_classes, in_channels, tx)
    return parallel.replicate(state, mesh), graph


def abstract_train_state(
    config, num_classes: int, in_channels: int, tx: optax.GradientTransformation, mesh
) -> tuple[TrainState, ModelGraph]:
    """Shapes, dtypes and (replicated) shardings of the state, without allocating it.

    The restore target for checkpoints: a state saved on any number of devices is
    restored onto ``mesh``.
    """
    holder = {}

    def make():
        state, holder["graph"] = init_train_state(config, num_classes, in_channels, tx)
        return state

    shapes = jax.eval_shape(make)
    sharding = parallel.replicated_sharding(mesh)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
    return abstract, holder["graph"]


def count_params(params: PyTree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
