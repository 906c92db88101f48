"""What the scripts in ``experiments/`` share, and only they use (not part of the library).

* :mod:`common.cmdline`: the flags every script shares, ``--config.FIELD=VALUE`` overrides,
  the command line that reproduces a result;
* :mod:`common.runs`: what a number was measured on, which dataset and recipe an experiment
  runs, running a recipe through the library's ``train_and_evaluate`` and reading its
  ``metrics.jsonl`` back, a recipe's plan without data or training;
* :mod:`common.gradient_flow`: per-layer gradient norms at initialisation and after ``k``
  SGD steps of the library's training step;
* :mod:`common.report`: tables (CSV + JSON) and plots (matplotlib, Agg backend);
* :mod:`common.references`: the published numbers printed beside measured ones;
* :mod:`common.standins`: offline stand-ins (an image folder, random weights) for quick runs.
* :mod:`common.jpegs`: generated ImageNet-sized JPEG folders and the pipeline's rate over them.

Each script puts its own directory first on ``sys.path`` and imports ``common`` from there,
so it works both as ``python experiments/NAME.py`` and when loaded from its file path
(``importlib.util.spec_from_file_location``, as the tests do).
"""
