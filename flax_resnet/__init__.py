"""flax_resnet: residual networks in JAX/Flax NNX that you can train, resume, scale and fine-tune."""

from flax_resnet.errors import UserError
from flax_resnet.models import ResNet, count_params, create_model, list_models

__version__ = "0.1.0"
__all__ = ["ResNet", "UserError", "count_params", "create_model", "list_models", "__version__"]
