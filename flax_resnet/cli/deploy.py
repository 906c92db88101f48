"""After training: ``export`` (ONNX, StableHLO) and ``explain`` (Grad-CAM)."""

from __future__ import annotations


# --------------------------------------------------------------------------- export
def _add_export(sub):
    p = sub.add_parser(
        "export", help="write a run's model (or a weights file) as ONNX or StableHLO for serving",
        description="Export a trained model for serving: eval mode, BatchNorm folded into the conv before it, "
                    "any batch size. ONNX takes NCHW float32, StableHLO NHWC; the input contract (size, "
                    "normalisation, class names) goes into the ONNX metadata or a .json beside the StableHLO "
                    "file. The written file is run once and its logits compared with the model's.")
    src = p.add_argument_group("what to export (one of)")
    src.add_argument("--workdir", default=None, help="a run directory given to `train` or `finetune`")
    src.add_argument("--pretrained", default=None, metavar="FILE",
                     help="a PyTorch-layout weights file (.safetensors/.pth), with --model")
    p.add_argument("--model", default=None, help="architecture of --pretrained's weights, e.g. resnet50")
    p.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                   help="for --workdir: the best-by-test-accuracy checkpoint (default) or the newest one")
    p.add_argument("--format", default="onnx", metavar="onnx|stablehlo", help="output format (default onnx)")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    p.add_argument("--raw-pixels", action="store_true",
                   help="put the normalisation in the graph: the exported model takes pixels 0-255")
    p.add_argument("--image-size", type=int, default=None,
                   help="for --pretrained: input side (default: the model's)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip running the written file to compare its logits with the model's")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args):
    from flax_resnet.export import export

    print(export(args.out, workdir=args.workdir, which=args.checkpoint, pretrained=args.pretrained, model=args.model,
                 format=args.format, raw_pixels=args.raw_pixels, image_size=args.image_size, verify=args.verify))


# --------------------------------------------------------------------------- explain
def _add_explain(sub):
    p = sub.add_parser(
        "explain", help="Grad-CAM heatmaps of what a run's network looks at, as PNGs with the top-5 classes",
        description="For each image: the predicted classes and a Grad-CAM heatmap (a stage's feature maps "
                    "weighted by the top class's gradient) overlaid on the image, saved as a PNG.")
    p.add_argument("--workdir", required=True, help="the run directory given to `train` or `finetune`")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--out", default="explain", metavar="DIR", help="directory for the PNGs (default ./explain)")
    p.add_argument("--layer", default=None, metavar="NAME",
                   help="the stage whose features to use, e.g. layer3 (default: the last one whose map is at "
                        "least 4x4)")
    p.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                   help="the best-by-test-accuracy checkpoint (default) or the newest one")
    p.set_defaults(func=_cmd_explain)


def _cmd_explain(args):
    from flax_resnet.explain import explain

    for r in explain(args.workdir, args.images, out_dir=args.out, layer=args.layer, which=args.checkpoint):
        print(f"{r.image} -> {r.png} ({r.layer})")
        for name, prob in r.top:
            print(f"  {prob:7.2%}  {name}")


SUBCOMMANDS = [_add_export, _add_explain]
