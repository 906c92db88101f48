"""The probes behind docs/performance.md: where XLA:CPU loses time, and how well conditioned a gradient is.

    python experiments/cpu_probes.py convs          # 3x3 conv GFLOP/s: YNNPACK vs XLA's own vs ours vs PyTorch
    python experiments/cpu_probes.py weightgrads --model resnet20 --batch 128
                                                    # our gradient formulations vs alternatives, in the real step (A/B)
    python experiments/cpu_probes.py batchnorm --model resnet20 --batch 128
                                                    # BatchNorm: our backward vs NNX's autodiff vs no statistics (bound), A/B
    python experiments/cpu_probes.py native         # fwd and dW alone: XLA's vs the native kernels', GFLOP/s
    python experiments/cpu_probes.py onednn --dtype float32
                                                    # every ResNet-20/50 conv alone: XLA vs native vs oneDNN, ms
    python experiments/cpu_probes.py onednn-steps --model resnet50 --batch 16 --dtype float32
                                                    # our train/eval steps with oneDNN serving kxk, 1x1 convs (A/B)
    python experiments/cpu_probes.py layers         # ResNet-50's kxk convolutions one by one: fwd, dx, dW, totals
    python experiments/cpu_probes.py winograd       # 3x3 convs by Winograd F(2x2,3x3) vs XLA's own (tried, dropped)
    python experiments/cpu_probes.py reduction      # BatchNorm statistics under three YNNPACK fusion lists
    python experiments/cpu_probes.py fusions --model resnet50 --batch 16
                                                    # our train/eval steps under YNNPACK fusion lists (A/B);
                                                    # --options NAME=VALUE: our list plus other XLA options
    python experiments/cpu_probes.py faults --model resnet20 --batch 128 --steps 10
                                                    # per step: MB page-faulted in, sys/user CPU ms, max RSS
    python experiments/cpu_probes.py profile --model resnet50 --batch 16 --plain
                                                    # per-op thread time of one train step, by op kind
    python experiments/cpu_probes.py conditioning --model resnet18 --batch 8 --size 32
                                                    # gradient vs float64, and float64's sensitivity to 1e-6 noise

Each prints one line per measurement. Timings are minima of repeats (convs, layers, winograd,
reduction), medians of interleaved repeats of our real steps (fusions, weightgrads, batchnorm) or thread
time summed over the profiled steps (profile); run them on a quiet machine. fusions,
weightgrads, batchnorm and layers on ResNet-50 take several minutes each on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # `probes` sits beside this script, however it is loaded
    sys.path.insert(0, _HERE)
from probes import numerics, ops, steps  # noqa: E402

from flax_resnet import cpu  # noqa: E402

winograd_3x3 = ops.winograd_3x3


def main(argv=None) -> int:
    cpu.tune_host_allocator()  # as `flax-resnet` runs (FLAX_RESNET_NO_MALLOC_TUNING=1: glibc's defaults)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="probe", required=True)
    sub.add_parser("convs", help="3x3 convolution GFLOP/s")
    sub.add_parser("native", help="forward and kernel gradient alone: XLA's vs the native kernels'")
    q = sub.add_parser("onednn", help="every ResNet-20/50 convolution alone: XLA's vs native vs oneDNN")
    q.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    q.add_argument("--models", nargs="*", default=("resnet20", "resnet50"))
    q.add_argument("--batch", type=int, default=16, help="ResNet-50's batch")
    q.add_argument("--repeats", type=int, default=7)
    sub.add_parser("layers", help="ResNet-50's kxk convolutions one by one")
    sub.add_parser("winograd", help="3x3 convolutions by Winograd F(2x2,3x3) vs XLA's own")
    sub.add_parser("reduction", help="BatchNorm statistics vs YNNPACK fusion lists")
    for name in ("profile", "conditioning", "fusions", "weightgrads", "batchnorm", "faults", "onednn-steps"):
        q = sub.add_parser(name)
        q.add_argument("--model", default="resnet20")
        q.add_argument("--batch", type=int, default=8 if name == "conditioning" else 128)
        q.add_argument("--size", type=int, default=32 if name == "conditioning" else None)
        if name == "profile":
            q.add_argument("--plain", action="store_true", help="the plain model instead of the CPU backend's")
            q.add_argument("--steps", type=int, default=2)
        if name == "faults":
            q.add_argument("--steps", type=int, default=10, help="steps measured one by one")
        if name == "onednn-steps":
            q.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
            q.add_argument("--variants", nargs="*", default=list(steps.ONEDNN_TABLES), choices=list(steps.ONEDNN_TABLES))
        if name in ("fusions", "weightgrads", "batchnorm", "onednn-steps"):
            q.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
            q.add_argument("--repeats", type=int, default=3)
        if name == "fusions":
            q.add_argument("--lists", nargs="*", default=steps.FUSION_LISTS,
                           help="comma-separated LIBRARY_FUSION_TYPE_ suffixes, one list per variant")
            q.add_argument("--options", nargs="*", default=(), metavar="NAME=VALUE[+NAME=VALUE]",
                           help="more variants: our fusion list plus these XLA:CPU compiler options")
    args = p.parse_args(argv)
    {"convs": ops.convs, "native": ops.native_ops, "onednn": ops.onednn_ops, "layers": ops.layers, "winograd": ops.winograd,
     "reduction": ops.reduction, "profile": steps.profile, "conditioning": numerics.conditioning,
     "fusions": steps.fusions, "weightgrads": steps.weightgrads, "batchnorm": steps.batchnorm,
     "faults": steps.faults, "onednn-steps": steps.onednn_steps}[args.probe](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
