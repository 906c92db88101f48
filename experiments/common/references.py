"""Published numbers the scripts print beside measured ones, each with its source."""

from __future__ import annotations

# He et al. 2015 (arXiv:1512.03385), Table 6: CIFAR-10 test error (%) of the 6n+2 ResNets.
# ResNet-110 is the best of 5 runs (mean 6.61 +/- 0.16).
PAPER_CIFAR10_TEST_ERROR = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97,
                            "resnet110": 6.43}
# ImageNet ResNet-50 top-1 accuracy (%), single 224 centre crop.
REFERENCE_IMAGENET_RESNET50 = {
    "flax_imagenet_example": {"top1": 76.5, "epochs": 100,
                              "source": "Flax examples/imagenet README: ResNet-50, 100 epochs"},
    "torchvision_v1_weights": {"top1": 76.13,
                               "source": "torchvision ResNet50_Weights.IMAGENET1K_V1 model card"},
}
# torchvision's resnet50 parameter count (torchvision.models.resnet50().parameters()).
TORCHVISION_RESNET50_PARAMS = 25_557_032
# ImageNet-1k (ILSVRC 2012) training images.
IMAGENET_TRAIN_IMAGES = 1_281_167
