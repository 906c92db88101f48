"""The article's network (``article_resnet``) and setup on CIFAR-10.

SGD lr 0.1 (constant), momentum 0.9, batch 128, 10 epochs, no weight decay.

Prepare: flax-resnet prepare cifar10
Run:     flax-resnet train --config cifar10_article --workdir runs/cifar10_article
Expect:  not yet measured here (no CIFAR-10 on the build machine); a small ResNet
         trained this way typically lands around 80% test top-1 after 10 epochs.
"""

from flax_resnet.configs import default


def get_config():
    c = default.get_config()
    c.model = "article_resnet"
    c.dataset = "cifar10"
    c.batch_size = 128
    c.num_epochs = 10
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.weight_decay = 0.0
    c.schedule = "constant"
    c.log_every_steps = 50
    return c
