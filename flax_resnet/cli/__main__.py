"""``python -m flax_resnet.cli``: the same as the ``flax-resnet`` command."""

import sys

from flax_resnet.cli import main

sys.exit(main())
