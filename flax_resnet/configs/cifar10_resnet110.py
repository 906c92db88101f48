"""ResNet-110 on CIFAR-10, the paper's recipe (He et al. 2015, section 4.2).

Same setup as ``cifar10_resnet20`` (batch 128, lr 0.1, momentum 0.9, weight decay 1e-4,
lr / 10 at 32k and 48k, stop at 64k). The paper warms up with lr 0.01 for the first
~400 iterations; here a linear warm-up over the first 400 updates plays that role.

Prepare: flax-resnet prepare cifar10
Run:     flax-resnet train --config cifar10_resnet110 --workdir runs/cifar10_resnet110
Expect:  93.4% test top-1 per the paper (Table 6: 6.43% best, 6.61 +/- 0.16% mean of 5
         runs); not run here.
"""

from flax_resnet.configs import cifar10_resnet20


def get_config():
    c = cifar10_resnet20.get_config()
    c.model = "resnet110"
    c.warmup_steps = 400
    return c
