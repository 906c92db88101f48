"""Fine-tune an ImageNet-pretrained ResNet-50 on your own folder of images.

The folder holds ``train/<class>/*`` and ``val/<class>/*`` (any image format Pillow
reads); ``finetune`` prepares it on first use. Weights: torchvision's or timm's
``resnet*``/``wide_resnet*``/``resnext*`` state dict as ``.safetensors`` (no PyTorch
needed) or ``.pth`` (read with ``torch.load(weights_only=True)``); see README.

Run:     flax-resnet finetune --pretrained resnet50.safetensors --model resnet50 \
           --dataset folder:PATH --workdir runs/my_finetune
         (add --freeze-backbone for a linear probe, its BatchNorm statistics frozen too,
         --unfreeze-epochs 2,4 for gradual unfreezing, --no-freeze-bn-stats to let frozen
         layers' BatchNorms use batch statistics, or any --config.FIELD=VALUE)

Recipe: a new head sized to the folder's classes, 224x224 Inception crops + flips,
batch 32, SGD momentum 0.9 (Nesterov), cosine from lr 0.01 for the head and 0.001
(backbone_lr_mult 0.1) for the pretrained backbone, weight decay 1e-4 on kernels,
label smoothing 0.1, 10 epochs, float32 (pass --config.half_precision=true on a GPU).

Expect:  no figure of ours: real pretrained weights cannot be downloaded here, so this recipe
         has run only on seeded random weights (the tests fine-tune a tiny model on
         synthetic patterns on CPU in seconds).
"""

from flax_resnet.configs import default


def get_config():
    c = default.get_config()
    c.model = "resnet50"
    c.dataset = ""          # set with --dataset folder:PATH
    c.image_size = 224
    c.batch_size = 32
    c.num_epochs = 10
    c.learning_rate = 0.01  # the head's; the backbone's is learning_rate * backbone_lr_mult
    c.backbone_lr_mult = 0.1
    c.schedule = "cosine"
    c.warmup_epochs = 0.0
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 1e-4
    c.label_smoothing = 0.1
    c.freeze_backbone = False
    c.freeze_bn_stats = None  # follows freeze_backbone / unfreeze_epochs group by group
    c.unfreeze_epochs = ()
    c.num_workers = 0
    c.log_every_steps = 10
    return c
