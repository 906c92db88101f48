"""ResNet model zoo in Flax NNX (NHWC, torchvision-style attribute names)."""

from flax_resnet.models.blocks import (ArticleBlock, BasicBlock, Bottleneck, PlainBlock,
                                       PreActBasicBlock, PreActBottleneck)
from flax_resnet.models.registry import (ModelSpec, count_params, create_model, forward_flops,
                                         get_spec, list_models)
from flax_resnet.models.resnet import ResNet

__all__ = ["ArticleBlock", "BasicBlock", "Bottleneck", "PlainBlock", "PreActBasicBlock",
           "PreActBottleneck", "ModelSpec", "ResNet", "count_params", "create_model",
           "forward_flops", "get_spec", "list_models"]
