"""ResNet-20 on the embedded ``digits`` dataset: the default recipe and the README's first command.

scikit-learn's 1,797 real 8x8 handwritten digits brought to 32x32 (1,437 train / 360
test, fixed split), no download. Batch 64, SGD lr 0.1 momentum 0.9, weight decay 5e-4
on kernels, 1-epoch linear warm-up then cosine, 10 epochs (220 steps).

Run:    flax-resnet train                       (same as --config digits_resnet20)
Expect: ~99% test top-1 in under 2 minutes on 2 CPU cores. Our runs (BUILD_NOTES.md, "Main
        job"): 98.61% final, 99.17% best, 40.7 s wall on a 2-core AVX-512 Xeon VM (machine D);
        99.17% final, 99.44% best, 99.3 s of training on a 2-core AVX2 EPYC VM (machine A).
"""

from flax_resnet.configs import default


def get_config():
    c = default.get_config()
    c.model = "resnet20"
    c.dataset = "digits"
    c.batch_size = 64
    c.num_epochs = 10
    c.learning_rate = 0.1
    c.schedule = "cosine"
    c.warmup_epochs = 1.0
    c.weight_decay = 5e-4
    c.log_every_steps = 5
    return c
