"""The plain PyTorch training job that ``flax-resnet benchmark --job`` races our ``flax-resnet train`` against.

Run as a script (``python torch_job.py SPEC.json``), never imported by the package at run time: it
imports only the standard library, numpy and torch, so its start-up is what a plain PyTorch
script's is (importing ``flax_resnet`` would load JAX). What it trains, from SPEC.json (written
by :mod:`flax_resnet.benchmark.job`):

* data: the recipe's train and test pixels (uint8, from our prepared dataset, in an ``.npz``
  the parent writes before timing) and its stream: epoch ``e`` visits the train split in
  ``np.random.default_rng([seed, e]).permutation(N)`` order, ``N // B`` batches, each
  zero-padded by ``pad`` and randomly cropped with the draws of
  ``np.random.default_rng([seed, k, 1])`` (no flips: digits), as
  :mod:`flax_resnet.data.batches` defines it, then normalised with the recipe's mean/std;
* model: :mod:`flax_resnet.benchmark.torch_twin`'s network (the same code, read from its
  source), float32, NCHW (``channels_last`` optional), its own initialisation (torchvision's);
* recipe: SGD with momentum, L2 weight decay on conv/linear weights only, linear warm-up then
  cosine per step (optax's schedule, as a ``LambdaLR``), cross-entropy;
* an evaluation of the whole test split after every epoch (no padding: the last batch is
  short), no checkpoints, no logs but one line per epoch and a final JSON line.
"""

from __future__ import annotations

import ast
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

TWIN_SOURCE = Path(__file__).with_name("torch_twin.py")
_T0 = time.perf_counter()


def twin_classes() -> dict[str, Any]:
    """torch_twin's network classes, built from its source without importing ``flax_resnet``."""
    tree = ast.parse(TWIN_SOURCE.read_text(), str(TWIN_SOURCE))
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("_torch", "_build")]
    namespace: dict[str, Any] = {"Any": Any, "UserError": RuntimeError}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), str(TWIN_SOURCE), "exec"), namespace)  # noqa: S102
    return namespace["_build"]()


def build_model(spec: dict):
    """ResNet of ``spec["model_kwargs"]`` (torch_twin's ``ResNet`` arguments) for the spec's data."""
    classes = twin_classes()
    kw = dict(spec["model_kwargs"])
    block = classes[{"basic": "BasicBlock", "bottleneck": "Bottleneck"}[kw.pop("block")]]
    layers = kw.pop("layers")
    return classes["ResNet"](block, layers, spec["num_classes"], in_channels=spec["in_channels"], **kw)


def train_batch(images: np.ndarray, labels: np.ndarray, step: int, *, seed: int, batch: int, pad: int):
    """Global training batch ``step``: ``(uint8 [B, H, W, C], int labels)``, our data stream's."""
    n = len(images)
    steps_per_epoch = n // batch
    epoch, j = divmod(step, steps_per_epoch)
    idx = np.random.default_rng([seed, epoch]).permutation(n)[j * batch:(j + 1) * batch]
    x, y = images[idx], labels[idx]
    if pad:
        rng = np.random.default_rng([seed, step, 1])
        oy, ox = rng.integers(0, 2 * pad + 1, size=batch), rng.integers(0, 2 * pad + 1, size=batch)
        h, w = x.shape[1:3]
        padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        rows, cols = oy[:, None] + np.arange(h)[None], ox[:, None] + np.arange(w)[None]
        x = padded[np.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return x, y


def lr_factor(step: int, warmup: int, total: int) -> float:
    """optax's ``linear_schedule(0, 1, warmup)`` joined to ``cosine_decay_schedule(1, total - warmup)``."""
    if step < warmup:
        return step / warmup
    decay = max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay) / decay))


def main(spec_path: str) -> int:
    import torch
    import torch.nn.functional as F

    spec = json.loads(Path(spec_path).read_text())
    data = np.load(spec["data"])
    torch.manual_seed(spec["seed"])
    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32).view(1, -1, 1, 1)
    fmt = torch.channels_last if spec.get("channels_last") else torch.contiguous_format

    def to_input(x: np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255)
        return ((t - mean) / std).contiguous(memory_format=fmt)

    model = build_model(spec).to(memory_format=fmt)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": spec["weight_decay"]},
                           {"params": no_decay, "weight_decay": 0.0}], lr=spec["learning_rate"],
                          momentum=spec["momentum"])
    batch, epochs = spec["batch_size"], spec["num_epochs"]
    steps_per_epoch = len(data["train_labels"]) // batch
    total, warmup = epochs * steps_per_epoch, spec["warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total))
    test_x, test_y = data["test_images"], torch.from_numpy(data["test_labels"].astype(np.int64))
    print(f"start {time.perf_counter() - _T0:.2f}s: {total} steps, {epochs} epochs", flush=True)
    step, top1, best = 0, float("nan"), 0.0
    for epoch in range(epochs):
        model.train()
        losses = []
        for _ in range(steps_per_epoch):
            x, y = train_batch(data["train_images"], data["train_labels"], step, seed=spec["seed"], batch=batch,
                               pad=spec["pad"])
            loss = F.cross_entropy(model(to_input(x)), torch.from_numpy(y.astype(np.int64)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach())
            step += 1
        model.eval()
        correct, test_loss = 0, 0.0
        with torch.inference_mode():
            for lo in range(0, len(test_y), batch):
                logits = model(to_input(test_x[lo:lo + batch]))
                y = test_y[lo:lo + batch]
                test_loss += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(-1) == y).sum())
        top1 = correct / len(test_y)
        best = max(best, top1)
        print(f"epoch {epoch + 1}/{epochs}  step {step}  train loss {float(torch.stack(losses).mean()):.4f}  "
              f"test loss {test_loss / len(test_y):.4f}  test top-1 {100 * top1:.2f}%", flush=True)
    print(json.dumps({"final_top1": top1, "best_top1": best, "steps": step,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
