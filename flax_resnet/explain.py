"""``flax-resnet explain``: Grad-CAM heatmaps of where a trained network looks, saved over each image.

Grad-CAM (Selvaraju et al. 2017): for a stage's feature maps ``A`` [h, w, C] and the top class's
logit ``y``, weight each channel by the spatial mean of ``dy/dA`` and keep the positive part of
the weighted sum, ``relu(sum_c mean_hw(dy/dA_c) A_c)``; upsampled to the image, it shows which
regions raise that class's score. By default the stage is the last one whose map is at least 4x4
(the last stage of an ImageNet ResNet is 7x7 at 224; the article's network is 1x1 from its
fourth block on, where a heatmap has a single cell and says nothing about position).

The gradient is taken at the stage's output by running the rest of the network from there
(:func:`forward_from`): the later stages, a pre-activation net's final BN/ReLU, and the head.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_resnet.data import DatasetInfo, open_image, preprocess_for_eval
from flax_resnet.errors import UserError
from flax_resnet.export.source import ExportSource, from_run
from flax_resnet.models.layers import apply_sequence

MIN_SIDE = 4  # the default stage's feature map is at least this many cells on a side


@dataclasses.dataclass
class Explanation:
    """One image's result: ``top`` ``(class, probability)`` pairs, the ``heatmap`` [H, W] in 0-1 at the
    image's model resolution (for ``class_index``, the top class), the ``layer`` used and the ``png`` written."""

    image: str
    top: list[tuple[str, float]]
    class_index: int
    heatmap: np.ndarray
    layer: str
    png: Path | None


def stage_names(model: nnx.Module) -> list[str]:
    """The layers Grad-CAM can use: ``"stem"``, then ``"layer1"``.. ``"layerN"``."""
    return ["stem"] + [f"layer{i + 1}" for i in range(len(model.stages()))]


def forward_from(model: nnx.Module, layer: str, features: jax.Array) -> jax.Array:
    """The logits, from ``layer``'s output (``forward_features``'s intermediate of that name) on."""
    names = stage_names(model)
    stages = model.stages()
    x = features
    for i in range(names.index(layer), len(stages)):
        if getattr(model, "stem", None) == "article" and i > 0:  # ResNet's article stem pools between stages
            x = model.max_pool(x, 2, 2)
        stage = stages[i]
        x = apply_sequence(stage, x) if isinstance(stage, nnx.List) else stage(x)
    if getattr(model, "bn_final", None) is not None:
        x = nnx.relu(model.bn_final(x))
    return model.forward_head(x)


def default_layer(model: nnx.Module, image_shape: tuple[int, int, int]) -> str:
    """The last stage whose feature map is at least :data:`MIN_SIDE` on each side (else the stem)."""
    # nnx.eval_shape: the model may itself be abstract (built under nnx.eval_shape).
    _, inter = nnx.eval_shape(lambda m, x: m.forward_features(x, return_intermediates=True), model,
                              jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    big = [n for n in stage_names(model) if min(inter[n].shape[1:3]) >= MIN_SIDE]
    return big[-1] if big else "stem"


def grad_cam(model: nnx.Module, images: jax.Array, *, layer: str | None = None,
             target: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Grad-CAM maps of ``images`` (NHWC, as the model sees them) at the feature map's resolution.

    Args:
      model: a model in eval mode (a ResNet or the article's network).
      layer: a name from :func:`stage_names`; default :func:`default_layer`.
      target: the class per image to explain; default each image's top class.

    Returns:
      ``(cams [N, h, w] scaled to a maximum of 1 (all zero when nothing is positive), logits [N, classes], layer)``.
    """
    images = jnp.asarray(images, jnp.float32)
    layer = layer or default_layer(model, tuple(images.shape[1:]))
    if layer not in stage_names(model):
        raise UserError(f"unknown layer {layer!r}; choose one of {', '.join(stage_names(model))}")

    @jax.jit
    def cams(x, target):
        _, inter = model.forward_features(x, return_intermediates=True)
        feats = inter[layer]
        logits, vjp = jax.vjp(lambda f: forward_from(model, layer, f), feats)
        target = jnp.where(target < 0, jnp.argmax(logits, -1), target)
        (grads,) = vjp(jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype))
        weights = grads.mean(axis=(1, 2), keepdims=True)            # [N, 1, 1, C]
        cam = jax.nn.relu((weights * feats).sum(-1))                 # [N, h, w]
        peak = cam.max(axis=(1, 2), keepdims=True)
        return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0), logits

    t = jnp.full((images.shape[0],), -1, jnp.int32) if target is None else jnp.asarray(target, jnp.int32)
    cam, logits = cams(images, t)
    return np.asarray(cam), np.asarray(logits), layer


def upsample(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of ``cams`` [N, h, w] to [N, *size] (cell centres aligned, as the pixels they cover)."""
    cams = jnp.asarray(cams)
    return np.asarray(jax.image.resize(cams, (cams.shape[0], *size), "bilinear"))




def save_overlay(path: str | os.PathLike, image: np.ndarray, heatmap: np.ndarray, top: list[tuple[str, float]],
                 title: str = "") -> None:
    """Writes a PNG: ``image`` (float [H, W, C] in 0-1) beside itself under the ``heatmap`` (jet, half
    transparent), with the ``top`` classes and probabilities written underneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = image[..., 0] if image.shape[-1] == 1 else image
    cmap = "gray" if image.shape[-1] == 1 else None
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.9))
    axes[0].imshow(shown, cmap=cmap, vmin=0, vmax=1)
    axes[1].imshow(shown, cmap=cmap, vmin=0, vmax=1)
    axes[1].imshow(heatmap, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    for ax in axes:
        ax.axis("off")
    axes[0].set_title("input", fontsize=9)
    axes[1].set_title(f"Grad-CAM: {top[0][0]}" if top else "Grad-CAM", fontsize=9)
    fig.text(0.02, 0.02, "\n".join(f"{p:6.1%}  {name}" for name, p in top), family="monospace", fontsize=8,
             va="bottom")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(bottom=0.3, top=0.85, wspace=0.05)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _info(src: ExportSource) -> DatasetInfo:
    shape = (src.image_size, src.image_size, src.in_channels)
    return DatasetInfo(src.name, src.model.num_classes, shape, 0, 0, "", src.class_names, src.mean, src.std)


def explain(workdir: str | os.PathLike, image_paths: Sequence[str | os.PathLike], *,
            out_dir: str | os.PathLike | None = "explain", layer: str | None = None, which: str = "best",
            top_k: int = 5) -> list[Explanation]:
    """Grad-CAM for each image file with a run's ``which`` checkpoint; one PNG per image in ``out_dir``
    (``<image stem>_gradcam.png``; None writes nothing). Images are preprocessed as ``flax-resnet predict`` does."""
    if not image_paths:
        raise UserError("no images given; pass one or more image files: flax-resnet explain --workdir DIR IMG...")
    missing = [str(p) for p in image_paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"image file(s) not found: {', '.join(missing)}; check the paths")
    if out_dir is not None:
        out_dir = Path(out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create output directory {out_dir}: {e.strerror or e}; "
                            "choose another --out") from None
    src = from_run(workdir, which)
    info = _info(src)
    images = np.stack([np.asarray(preprocess_for_eval(open_image(p), info), np.float32) for p in image_paths])
    cams, logits, layer = grad_cam(src.model, images, layer=layer)
    heatmaps = upsample(cams, images.shape[1:3])
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    shown = images * np.asarray(src.std, np.float32) + np.asarray(src.mean, np.float32) if src.mean else images
    names = list(src.class_names)
    results = []
    for i, path in enumerate(image_paths):
        order = np.argsort(-probs[i])[:top_k]
        top = [(names[j] if j < len(names) else str(j), float(probs[i, j])) for j in order]
        png = None
        if out_dir is not None:
            png = out_dir / f"{Path(path).stem}_gradcam.png"
            try:
                save_overlay(png, np.clip(shown[i], 0, 1), heatmaps[i], top, title=f"{Path(path).name} ({layer})")
            except OSError as e:
                raise UserError(f"cannot write {png}: {e.strerror or e}; choose another --out") from None
        results.append(Explanation(str(path), top, int(order[0]), heatmaps[i], layer, png))
    return results
