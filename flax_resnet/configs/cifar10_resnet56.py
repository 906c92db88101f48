"""ResNet-56 on CIFAR-10, the paper's recipe (He et al. 2015, section 4.2).

Same setup as ``cifar10_resnet20``: batch 128, lr 0.1, momentum 0.9, weight decay
1e-4, lr / 10 at 32k and 48k iterations, 64k iterations in all.

Prepare: flax-resnet prepare cifar10
Run:     flax-resnet train --config cifar10_resnet56 --workdir runs/cifar10_resnet56
Expect:  93.03% test top-1 per the paper (Table 6: 6.97% error); not run here.
"""

from flax_resnet.configs import cifar10_resnet20


def get_config():
    c = cifar10_resnet20.get_config()
    c.model = "resnet56"
    return c
