"""Defaults every recipe starts from. Not a recipe itself: recipes override these fields.

Fields:
  model, model_kwargs: a registered model name (``flax-resnet models``) and extra
    keyword arguments for ``create_model`` (e.g. ``shortcut``); zero_init_residual.
  dataset, data_dir, eval_split: dataset name for the data layer, its directory (None:
    the default) and the split evaluated each epoch (None: the dataset's test split).
  batch_size: *global* batch over all devices; eval_batch_size (0: from batch_size up to
    twice it, the smallest that pads the eval split least).
  grad_accum_steps: > 1 splits each global batch into that many micro-batches inside the
    train step and averages their gradients (one update per global batch, a k-th of the
    activation memory); BatchNorm normalises each micro-batch with its own statistics and
    updates its running statistics once per micro-batch. 1: off.
  num_epochs, or num_train_steps (> 0 wins): training length.
  learning_rate, linear_scaling (lr = learning_rate * batch_size / 256), schedule
    ('step' | 'cosine' | 'constant'), warmup_epochs / warmup_steps,
    lr_boundaries_steps / lr_boundaries_epochs and lr_decay_factor ('step' only).
  optimizer ('sgd' | 'adamw' | 'lamb'); momentum, nesterov (SGD); adam_b1, adam_b2,
    adam_eps (AdamW, LAMB); weight_decay (conv/linear kernels only: L2 added to the
    gradient for SGD, decoupled for AdamW/LAMB); grad_clip_norm (> 0: clip the gradient's
    global L2 norm to this; 0: off); label_smoothing.
  half_precision: bfloat16 compute, float32 params, BatchNorm statistics and loss.
  ema_decay: > 0 keeps an exponential moving average of the params and BatchNorm
    statistics (``ema = decay * ema + (1 - decay) * new`` after every update, starting
    from the initial weights), checkpointed and evaluated each epoch beside the weights
    (``ema_test_top1``); 0: off. best_metric: which test top-1 picks the best checkpoint,
    'test_top1' (the weights) or 'ema_test_top1'.
  augment, num_workers: data augmentation on/off and data-loader worker processes (-1: one per
    core but one; 0: in this process).
  augment_flip: horizontal flips in that augmentation (where the dataset gets them;
    never on digits); False keeps the random crops, for recipes that do not flip.
  normalize: per-channel mean/std normalisation of train, eval and predict images;
    False feeds ``pixel / 255`` (torchvision's ``ToTensor()`` alone, as the article does).
  image_size: side of the square images of variable-size datasets (folders, ImageNet);
    0: the data layer's default (224). Fixed-size datasets (digits, CIFAR) ignore it.
  pretrained: a torchvision/timm weights file (.safetensors or .pth) loaded into a fresh
    run before the first step (a resumed run restores its checkpoint instead);
    keep_pretrained_head: also load its classifier (default: a new head sized to the
    dataset). Fine-tuning (flax_resnet.training.finetune): freeze_backbone (exactly zero
    updates for all but ``fc``), freeze_bn_stats (backbone BatchNorm uses and keeps its
    running statistics; None: follow the parameters, i.e. a backbone group's statistics
    are frozen while its parameters are), backbone_lr_mult (backbone lr = learning_rate * this),
    unfreeze_epochs (gradual unfreezing: epoch from which each backbone group, from the
    top, trains; unlisted groups stay frozen).
  cpu_fast_path: on the CPU backend, build the model from flax_resnet.cpu's fast layers
    (same parameters; False: the plain layers and XLA's default compiler options).
  log_every_steps, checkpoint_every_steps (0: only at epoch ends), max_to_keep,
  async_checkpointing, seed.
  profile_steps: a jax.profiler trace of some train steps into <workdir>/profile/, for
    TensorBoard's Profile tab: "FIRST,END" (step numbers) or a count "N" (N steps after
    the first of the run); "": off.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "resnet20"
    c.model_kwargs = ml_collections.ConfigDict()
    c.zero_init_residual = False

    c.dataset = "digits"
    c.data_dir = None
    c.eval_split = None
    c.augment = True
    c.augment_flip = True
    c.normalize = True
    c.num_workers = 0
    c.image_size = 0

    c.pretrained = ""
    c.keep_pretrained_head = False
    c.freeze_backbone = False
    c.freeze_bn_stats = None  # None: frozen exactly where the backbone's parameters are
    c.backbone_lr_mult = 1.0
    c.unfreeze_epochs = ()

    c.batch_size = 128
    c.eval_batch_size = 0
    c.grad_accum_steps = 1
    c.num_epochs = 10
    c.num_train_steps = -1

    c.learning_rate = 0.1
    c.linear_scaling = False
    c.schedule = "step"
    c.warmup_epochs = 0.0
    c.warmup_steps = 0
    c.lr_boundaries_steps = ()
    c.lr_boundaries_epochs = ()
    c.lr_decay_factor = 0.1

    c.optimizer = "sgd"
    c.momentum = 0.9
    c.nesterov = False
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.weight_decay = 1e-4
    c.grad_clip_norm = 0.0
    c.label_smoothing = 0.0
    c.half_precision = False
    c.ema_decay = 0.0
    c.best_metric = "test_top1"
    c.cpu_fast_path = True

    c.log_every_steps = 50
    c.profile_steps = ""
    c.checkpoint_every_steps = 0
    c.max_to_keep = 3
    c.async_checkpointing = True
    c.seed = 0
    return c
