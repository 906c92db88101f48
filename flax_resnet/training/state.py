"""The training state: a plain pytree of arrays, plus the model's static graph.

An NNX model is split once, at creation, into

* a static :class:`ModelGraph` (two ``nnx.GraphDef``: train mode and eval mode), closed
  over by the jitted steps and never walked per step, and
* a :class:`TrainState` pytree of pure dicts/arrays (params, BatchNorm statistics,
  optimiser state, step, base RNG key) that is jitted, donated, sharded and checkpointed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util

from flax_resnet import cpu, models, parallel, pretrained
from flax_resnet.training import optimizer
from flax_resnet.errors import UserError

PyTree = Any
HEAD = "fc"  # the classifier's attribute (torchvision's name)


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything that changes during training, as arrays (a pytree; ``replace`` returns a copy).

    Attributes:
      step: number of optimiser updates done (int32 scalar).
      params: ``nnx.Param`` values as a nested dict (conv/linear ``kernel``/``bias``, BN ``scale``/``bias``).
      batch_stats: ``nnx.BatchStat`` values (BatchNorm running ``mean``/``var``).
      opt_state: the optax state.
      rng: base PRNG key (raw ``uint32[2]``); per-step keys are ``fold_in(rng, step)``.
      ema: with ``config.ema_decay`` > 0, ``{"params": ..., "batch_stats": ...}``: exponential
        moving averages of both, updated by every train step; else None, and then absent from
        the pytree, so states and checkpoints without an EMA keep the structure they always had.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    rng: jax.Array
    ema: PyTree = None

    def replace(self, **changes) -> "TrainState":
        return dataclasses.replace(self, **changes)

    def ema_weights(self) -> "TrainState":
        """This state with the EMA's params and BatchNorm statistics as its weights (to evaluate them)."""
        return self.replace(params=self.ema["params"], batch_stats=self.ema["batch_stats"])


_STATE_FIELDS = ("step", "params", "batch_stats", "opt_state", "rng")


def _state_fields(state: TrainState) -> tuple[str, ...]:
    return _STATE_FIELDS + (("ema",) if state.ema is not None else ())


jax.tree_util.register_pytree_with_keys(
    TrainState,
    lambda s: ([(jax.tree_util.GetAttrKey(k), getattr(s, k)) for k in _state_fields(s)], s.ema is not None),
    lambda has_ema, children: TrainState(*children) if has_ema else TrainState(*children, ema=None),
    lambda s: ([getattr(s, k) for k in _state_fields(s)], s.ema is not None),
)


def ema_decay(config) -> float:
    """``config.ema_decay`` (0, the default: no EMA)."""
    return float(config.get("ema_decay", 0.0) or 0.0)


@dataclasses.dataclass(frozen=True)
class ModelGraph:
    """The static half of a split NNX model: one graph per BatchNorm mode.

    ``cpu_fast_path``: the model is built from :mod:`flax_resnet.cpu`'s layers; its steps are
    then jitted with :func:`flax_resnet.cpu.jit`.
    """

    train_graph: nnx.GraphDef
    eval_graph: nnx.GraphDef
    cpu_fast_path: bool = False

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


def uses_cpu_fast_path(config) -> bool:
    """Whether ``config``'s model is built from the CPU backend's layers: on the CPU backend unless
    ``config.cpu_fast_path`` is False (or, in configs written before that field,
    ``model_kwargs.conv_impl`` is ``"xla"``)."""
    legacy = (config.get("model_kwargs", {}) or {}).get("conv_impl")
    return bool(config.get("cpu_fast_path", True)) and legacy != "xla" and jax.default_backend() == "cpu"


def create_model(config, num_classes: int, in_channels: int, *, seed: int | None = None) -> nnx.Module:
    """The NNX model a config names (``config.model``), built through the model registry with the
    CPU backend's layers where :func:`uses_cpu_fast_path`."""
    kwargs = dict(config.get("model_kwargs", {}) or {})
    kwargs.pop("conv_impl", None)  # configs written before the CPU backend's split
    if config.get("zero_init_residual", False):
        kwargs["zero_init_residual"] = True
    if uses_cpu_fast_path(config):
        kwargs.update(cpu.layers())
    return models.create_model(
        config.model,
        num_classes=num_classes,
        in_channels=in_channels,
        rngs=nnx.Rngs(config.seed if seed is None else seed),
        dtype=compute_dtype(config),
        param_dtype=jnp.float32,
        **kwargs,
    )


def split_model(model: nnx.Module, *, freeze_bn_stats: bool = False,
                frozen_bn: Callable[[str], bool] | None = None) -> tuple[ModelGraph, PyTree, PyTree]:
    """Splits a model into ``(ModelGraph, params, batch_stats)`` with pure-dict states.

    With ``freeze_bn_stats`` the train graph's backbone BatchNorms (all but the head's)
    normalise with, and never update, their running statistics (fine-tuning). ``frozen_bn``
    chooses them instead: a predicate on a BatchNorm's top-level attribute name (``layer3``,
    ``bn1``), as :func:`flax_resnet.training.optimizer.bn_frozen_predicate` builds it.
    """
    if freeze_bn_stats:
        frozen_bn = lambda key: key != HEAD  # noqa: E731
    train_view = nnx.view(model, use_running_average=False, raise_if_not_found=False)
    if frozen_bn is not None:
        for path, module in nnx.iter_modules(train_view):
            if isinstance(module, nnx.BatchNorm) and path and frozen_bn(str(path[0])):
                module.use_running_average = True
    train_graph, params, batch_stats, rest = nnx.split(train_view, nnx.Param, nnx.BatchStat, ...)
    if jax.tree.leaves(rest):
        raise ValueError(
            f"model holds state other than nnx.Param/nnx.BatchStat, which training does not carry: {rest}"
        )
    eval_graph = nnx.graphdef(nnx.view(model, use_running_average=True, raise_if_not_found=False))
    return (ModelGraph(train_graph, eval_graph, cpu_fast_path=cpu.uses_fast_layers(model)), nnx.to_pure_dict(params),
            nnx.to_pure_dict(batch_stats))


def init_train_state(
    config, num_classes: int, in_channels: int, tx: optax.GradientTransformation, *,
    load_pretrained: bool = False,
) -> tuple[TrainState, ModelGraph]:
    """A fresh state (on the default device) and the model's static graph.

    With ``load_pretrained`` the weights in ``config.pretrained`` (if set) replace the
    random initialisation before the optimiser state is created; the head stays new
    unless ``config.keep_pretrained_head``.
    """
    frozen = optimizer.bn_frozen_predicate(config, optimizer.frozen_bn_groups(config, 0))
    if load_pretrained and config.get("pretrained"):
        model = create_model(config, num_classes, in_channels)
        pretrained.load_pretrained(model, config.pretrained,
                                   load_head=bool(config.get("keep_pretrained_head", False)))
        graph, params, batch_stats = split_model(model, frozen_bn=frozen)
        state = _fresh_state(params, batch_stats, tx, jax.random.PRNGKey(config.seed))
    else:
        init, key, graphs = _initialiser(config, num_classes, in_channels, tx, frozen)
        state, graph = init(key), graphs[0]
    return _with_ema(config, state), graph


def _with_ema(config, state):
    """``state`` with the EMA of its weights started at their values, when ``config`` keeps one."""
    if ema_decay(config) <= 0:
        return state
    if isinstance(state.step, jax.ShapeDtypeStruct):  # abstract: the same shapes
        return state.replace(ema={"params": state.params, "batch_stats": state.batch_stats})
    copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)  # noqa: E731  (own buffers: donated)
    return state.replace(ema={"params": copy(state.params), "batch_stats": copy(state.batch_stats)})


def _fresh_state(params, batch_stats, tx, rng) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=tx.init(params),
                      rng=rng)


def _initialiser(config, num_classes, in_channels, tx, frozen) -> tuple[Callable, jax.Array, list[ModelGraph]]:
    """The fresh state's initialiser, jitted, with its argument (the seed's key) and a list that
    holds the model's graph once it is traced.

    One program, bit for bit the values of building the model op by op (its initialisers are
    written to be), with the seed an argument: one executable for every seed, which the
    persistent compilation cache keeps, where op by op is one small compile per initialiser and
    shape in every process."""
    graphs = []

    def build(key):
        graph, params, batch_stats = split_model(create_model(config, num_classes, in_channels, seed=key),
                                                 frozen_bn=frozen)
        graphs.append(graph)
        return _fresh_state(params, batch_stats, tx, jax.random.key_data(key))

    return jax.jit(build), jax.random.key(config.seed), graphs


def compile_in_background(lowered: jax.stages.Lowered) -> concurrent.futures.Future:
    """``lowered.compile()`` on a thread; ``.result()`` is the executable. XLA's compile, and its load
    from the persistent cache, hold no GIL, so the caller's Python (tracing the next program) runs
    meanwhile: start-up's compiles and loads overlap its traces."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flax_resnet_compile")
    try:
        return pool.submit(lowered.compile)
    finally:
        pool.shutdown(wait=False)


def model_graph(config, num_classes: int, in_channels: int, frozen_bn_groups: frozenset[str]) -> ModelGraph:
    """The static graph of ``config``'s model with the BatchNorms of ``frozen_bn_groups`` on their
    running statistics in training: what gradual unfreezing switches to at a group's epoch.

    Built from an abstract model (shapes only), so nothing is initialised or allocated.
    """
    model = nnx.eval_shape(lambda: create_model(config, num_classes, in_channels))
    return split_model(model, frozen_bn=optimizer.bn_frozen_predicate(config, frozen_bn_groups))[0]


def create_train_state(
    config, num_classes: int, in_channels: int, tx: optax.GradientTransformation, mesh
) -> tuple[TrainState, ModelGraph]:
    """A fresh state replicated over ``mesh``, and the model's static graph.

    Loads ``config.pretrained`` weights, if set: only a fresh run does (a resumed run
    restores everything from its checkpoint).
    """
    state, graph = init_train_state(config, num_classes, in_channels, tx, load_pretrained=True)
    return parallel.replicate(state, mesh), graph


def start_train_state(
    config, num_classes: int, in_channels: int, tx: optax.GradientTransformation, mesh
) -> tuple[TrainState, ModelGraph, Callable[[], TrainState]]:
    """:func:`create_train_state` begun: ``(abstract, graph, result)``, where ``abstract`` holds the
    state's shapes, dtypes and (replicated) shardings, enough to lower the train step against, and
    ``result()`` returns the state itself. The initialiser compiles (or loads from the persistent
    cache) on a thread meanwhile (:func:`compile_in_background`). With ``config.pretrained`` the
    state is built at once."""
    sharding = parallel.replicated_sharding(mesh)
    if config.get("pretrained"):
        state, graph = create_train_state(config, num_classes, in_channels, tx, mesh)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding,
                                                               weak_type=x.weak_type), state)
        return abstract, graph, lambda: state
    frozen = optimizer.bn_frozen_predicate(config, optimizer.frozen_bn_groups(config, 0))
    init, key, graphs = _initialiser(config, num_classes, in_channels, tx, frozen)
    lowered = init.lower(key)
    graph, compiling = graphs[0], compile_in_background(lowered)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding, weak_type=s.weak_type),
                            lowered.out_info)
    return (_with_ema(config, abstract), graph,
            lambda: parallel.replicate(_with_ema(config, compiling.result()(key)), mesh))


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


def transfer_weights(target: PyTree, source: PyTree, *, new_head: bool = False, head: str = HEAD,
                     what: str = "the source weights") -> PyTree:
    """``target`` (nested dict of arrays) with every leaf taken from ``source``.

    The fine-tuning hook: ``new_head=True`` keeps ``target``'s (freshly initialised)
    classifier, the subtree under the top-level key ``head``, and loads everything else,
    so the class count may differ. Otherwise both trees must have the same paths and shapes.
    ``what`` names the source in error messages.

    Raises:
      UserError: naming the paths that are missing, extra or of another shape.
    """
    flat_t = traverse_util.flatten_dict(target)
    flat_s = traverse_util.flatten_dict(source)
    fresh = lambda path: new_head and path[0] == head  # noqa: E731
    name = lambda path: "/".join(str(k) for k in path)  # noqa: E731
    out, diffs = {}, []
    for path, t in flat_t.items():
        s = flat_s.get(path)
        if fresh(path):
            out[path] = t
        elif s is None:
            diffs.append(f"{name(path)} missing")
        elif tuple(s.shape) != tuple(t.shape):
            diffs.append(f"{name(path)} {tuple(s.shape)} (needs {tuple(t.shape)})")
        else:
            out[path] = jnp.asarray(s, dtype=t.dtype)
    diffs += [f"{name(p)} unexpected" for p in flat_s if p not in flat_t and not fresh(p)]
    if diffs:
        head_only = all(d.startswith(f"{head}/") for d in diffs)
        fix = ("start with a new classifier (new_head=True)" if head_only
               else "use weights of the same model (see `flax-resnet models`)")
        shown = ", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise UserError(f"{what} does not fit this model: {shown}; {fix}")
    return traverse_util.unflatten_dict(out)
