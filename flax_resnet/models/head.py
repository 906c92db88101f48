"""What every model of ours ends with: global average pooling, then the classifier ``fc``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_resnet.models.layers import uniform_fan_in


class ClassifierHead(nnx.Module):
    """Base class of our networks: ``forward_head``, ``reset_classifier`` and ``__call__``.

    A subclass sets ``dtype`` and ``num_features`` (the channels ``forward_features`` returns),
    implements ``forward_features`` and builds its head with :meth:`_make_head`.
    """

    dtype: Any
    num_features: int

    def _make_head(self, num_classes: int, rngs, param_dtype: Any = jnp.float32):
        """``nnx.Linear(num_features, num_classes)`` with PyTorch's default init; None for 0 classes."""
        self.num_classes = num_classes
        if num_classes <= 0:
            return None
        init = uniform_fan_in(self.num_features)  # PyTorch's nn.Linear default
        return nnx.Linear(self.num_features, num_classes, kernel_init=init, bias_init=init,
                          dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)

    def reset_classifier(self, num_classes: int, *, rngs: nnx.Rngs | None = None) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` (0: no head)."""
        param_dtype = self.fc.kernel[...].dtype if self.fc is not None else jnp.float32
        self.fc = self._make_head(num_classes, rngs or nnx.Rngs(0), param_dtype)

    def forward_head(self, features: jax.Array, *, pre_logits: bool = False) -> jax.Array:
        """Global average pool and classifier; ``pre_logits`` stops after the pool."""
        pooled = jnp.mean(features, axis=(1, 2))
        if pre_logits or self.fc is None:
            return pooled
        return self.fc(pooled)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward_head(self.forward_features(x))
