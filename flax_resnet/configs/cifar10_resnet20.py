"""ResNet-20 on CIFAR-10, the paper's recipe (He et al. 2015, section 4.2).

Batch 128, SGD lr 0.1, momentum 0.9, weight decay 1e-4, lr divided by 10 at 32k and
48k iterations, stop at 64k (~164 epochs of 50k images). Standard augmentation
(4-pixel pad, random 32x32 crop, horizontal flip). Option A (zero-padded identity)
shortcuts.

Prepare: flax-resnet prepare cifar10
Run:     flax-resnet train --config cifar10_resnet20 --workdir runs/cifar10_resnet20
Expect:  91.25% test top-1 per the paper (Table 6: 8.75% error); not run here (no CIFAR-10
         and no GPU on our build machines), so no time or accuracy of ours yet.
"""

from flax_resnet.configs import default


def get_config():
    c = default.get_config()
    c.model = "resnet20"
    c.dataset = "cifar10"
    c.batch_size = 128
    c.num_train_steps = 64_000
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.weight_decay = 1e-4
    c.schedule = "step"
    c.lr_boundaries_steps = (32_000, 48_000)
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2_000
    return c
