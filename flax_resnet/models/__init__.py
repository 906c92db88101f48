"""ResNet model zoo in Flax NNX (NHWC, torchvision-style attribute names), plain on every backend."""

from flax_resnet.models.article import ArticleResNet
from flax_resnet.models.blocks import (ArticleBlock, BasicBlock, Bottleneck, PlainBlock,
                                       PreActBasicBlock, PreActBottleneck)
from flax_resnet.models.layers import BatchNorm, Layers
from flax_resnet.models.registry import ModelSpec, create_model, get_spec, list_models
from flax_resnet.models.resnet import ResNet
from flax_resnet.models.summary import count_params, forward_flops, model_flops

__all__ = ["ArticleBlock", "ArticleResNet", "BasicBlock", "BatchNorm", "Bottleneck", "Layers", "ModelSpec",
           "PlainBlock", "PreActBasicBlock", "PreActBottleneck", "ResNet", "count_params", "create_model",
           "forward_flops", "get_spec", "list_models", "model_flops"]
