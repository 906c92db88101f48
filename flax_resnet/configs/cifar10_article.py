"""The article's network (``article_resnet``) and training recipe on CIFAR-10, exactly.

SGD lr 0.1 (constant), momentum 0.9, no weight decay, batch 128, 10 epochs; training
images zero-padded by 4 and randomly cropped back to 32x32 (``RandomCrop(32, padding=4)``),
no horizontal flips, no per-channel normalisation (the model sees ``ToTensor()``'s
``pixel / 255``). The one place we differ: the article random-crops its test images
too; we evaluate on the unaugmented test set.

Prepare: flax-resnet prepare cifar10
Run:     flax-resnet train --config cifar10_article --workdir runs/cifar10_article
Expect:  not yet measured (no CIFAR-10 on the build machine) and the article reports no
         figure; the number will come from `python experiments/article.py` on a machine
         with CIFAR-10 prepared, recorded in BUILD_NOTES.md with its command and machine.
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
    c.augment = True  # RandomCrop(32, padding=4): CIFAR-10's crop pads 4 pixels
    c.augment_flip = False
    c.normalize = False
    c.log_every_steps = 50
    return c
