"""ResNet-50 (v1.5) on ImageNet, as Flax's ImageNet example.

Global batch 1024, lr 0.4 (= 0.1 x 1024 / 256, the linear scaling rule), momentum 0.9,
Nesterov, weight decay 1e-4 on kernels, 5-epoch linear warm-up then cosine decay,
100 epochs, bfloat16 compute.

On GPUs and TPUs keep ``half_precision=True`` (the recommended setting there): bfloat16
convolutions and activations, float32 parameters, BatchNorm statistics and loss. On a CPU,
``--config.half_precision=false`` runs float32, where the CPU fast path's native kernels apply
(they are float32-only; in bfloat16 it uses XLA's convolutions).

Prepare: flax-resnet prepare imagenet2012 --data_dir DIR   (manual download, see README)
Run:     flax-resnet train --config imagenet_resnet50 --workdir runs/imagenet_resnet50 \
           --config.data_dir=DIR
Expect:  about 76% top-1 after 90-100 epochs (what Flax's ImageNet example reports for
         this setup); not run here (no ImageNet, no GPU), so no time or accuracy of ours.
"""

from flax_resnet.configs import default


def get_config():
    c = default.get_config()
    c.model = "resnet50"
    c.dataset = "imagenet2012"
    c.batch_size = 1024
    c.num_epochs = 100
    c.learning_rate = 0.1
    c.linear_scaling = True
    c.schedule = "cosine"
    c.warmup_epochs = 5.0
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 1e-4
    c.half_precision = True
    c.num_workers = -1  # one Grain worker per core but one: a 224 JPEG costs ~2 ms per core (docs/performance.md)
    c.log_every_steps = 100
    c.checkpoint_every_steps = 1_000
    return c
