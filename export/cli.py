"""``harma-fast export`` and ``harma-fast search``."""
from __future__ import annotations

import argparse
import sys

from ..cliargs import add_subparser, positive_int
from ..errors import CORE_PACKAGES, MissingDependencyError, require_modules
from ..io import check_output_dir, check_output_file, refuse_foreign_file, require_dir, require_file


def add_export_parsers(sub) -> None:
    p = add_subparser(sub, "export", "export the (adapted) encoders to ONNX, checked against PyTorch",
                      "Export the image and text encoders (backbone plus adapters) to ONNX graphs with a "
                      "harma.json describing them. Each graph is run with ONNX Runtime against PyTorch on "
                      "fresh inputs and refused, nothing written, if they differ.")
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture")
    p.add_argument("--pretrained", help="backbone weights: local file or cached tag (default: random weights)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapters", help="adapter file (.safetensors) from training")
    src.add_argument("--released", help="checkpoint of the released HarMA code (backbone + adapters)")
    p.add_argument("--ignore-backbone-mismatch", action="store_true",
                   help="use adapters on a backbone other than the one they were trained on")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--towers", nargs="+", default=["image", "text"], choices=["image", "text"],
                   help="which encoders to export")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "int8"],
                   help="fp32; fp16 (for the CUDA provider); int8 (dynamic int8 weights, for the CPU provider)")
    p.add_argument("--plain-onnx", action="store_true",
                   help="standard ONNX ops only (no ONNX Runtime contrib ops such as the fused Attention)")
    p.add_argument("--check-file", help="with --dtype int8: evaluation file on which int8 retrieval must match fp32's")
    p.add_argument("--image-root", help="image folder of --check-file")
    p.add_argument("--opset", type=positive_int, help="ONNX opset, 18 to the newest torch.onnx writes (default: the exporter's)")
    p.add_argument("--static-batch", type=positive_int, metavar="N",
                   help="fix the batch axis to N (for CUDA graphs; the runtime pads the last batch) "
                        "(default: a free batch axis)")
    p.set_defaults(handler=run_export)

    s = add_subparser(sub, "search", "search a folder of images with a caption, through the ONNX encoders",
                      "Rank the images of a folder by the cosine similarity of their embedding to the "
                      "caption's (1 = same direction; compare scores within one query, not across queries). "
                      "The folder is embedded once into an index that later searches reuse.")
    s.add_argument("query", help="the caption to search for")
    s.add_argument("--onnx", required=True, help="export folder (from harma-fast export)")
    s.add_argument("--images", required=True, help="folder of images (searched recursively)")
    s.add_argument("--top-k", type=positive_int, default=10, help="how many images to show")
    s.add_argument("--html", help="also write a page with the query and the retrieved images to this file")
    s.add_argument("--index", help="the embedding index: a .npz file, or a folder to keep indexes in (one per "
                   "image folder and export) (default: a folder in ~/.cache/harma_fast, or $HARMA_FAST_CACHE)")
    s.set_defaults(handler=run_search)


# what exporting needs of harma-fast's own dependencies (module: package), which a serving install
# (README: onnxruntime, numpy, pillow, regex, ftfy) lacks
EXPORT_NEEDS = {m: CORE_PACKAGES[m] for m in ("torch", "torchvision", "open_clip", "safetensors", "tqdm")}


def require_export_stack() -> None:
    """One line naming what is missing: in a serving install `export` died in `import torch`, reported as
    an internal error (a bug in harma-fast) with a traceback."""
    import importlib.util

    missing = [package for module, package in EXPORT_NEEDS.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingDependencyError(f"export needs {', '.join(missing)}, not installed here (serving with "
                                     "OrtEncoder and `search` does not, exporting does): pip install "
                                     "'harma-fast[onnx]' installs them")


def run_export(args: argparse.Namespace) -> int:
    for flag in ("adapters", "released"):
        if getattr(args, flag):
            require_file(getattr(args, flag), f"--{flag}")
    if args.check_file:
        require_file(args.check_file, "--check-file")
    if args.image_root:
        require_dir(args.image_root, "--image-root")
    check_output_dir(args.out, "--out")
    require_export_stack()
    require_modules(("onnx", "onnxscript", "onnxruntime"), "export")  # before the model is built

    from .. import create_model, load_adapters, load_released_checkpoint
    from .onnx_export import check_export_options, check_out_dir, export_onnx

    check_export_options(args.towers, args.dtype, args.opset, args.static_batch, not args.plain_onnx,
                         args.check_file, args.image_root, flags=True)
    check_out_dir(args.out, args.towers, "--out")

    model = create_model(args.model, args.pretrained)
    if args.adapters:
        load_adapters(model, args.adapters, check_backbone=not args.ignore_backbone_mismatch)
    elif args.released:
        load_released_checkpoint(model, args.released)
    meta = export_onnx(model, args.out, towers=args.towers, dtype=args.dtype, opset=args.opset,
                       batch_size=args.static_batch, model_name=args.model, fused=not args.plain_onnx,
                       check_file=args.check_file, image_root=args.image_root,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    worst = {t: (max(r["max_abs"] for r in rows), min(r["min_cosine"] for r in rows))
             for t, rows in meta.get("parity", {}).items()}
    for tower, (err, cos) in worst.items():
        print(f"{tower}.onnx: ONNX Runtime vs PyTorch max abs {err:.2e}, cosine >= {cos:.6f}")
    check = meta.get("retrieval_check")
    if check:
        print(f"retrieval on {check['check_file']}: mR int8 {check['int8']['r_mean']:.2f} vs fp32 "
              f"{check['fp32']['r_mean']:.2f}")
    print(f"wrote {', '.join(meta['towers'].values())} and harma.json to {args.out}")
    return 0


def run_search(args: argparse.Namespace) -> int:
    from .search import check_query

    query = check_query(args.query)  # before anything is loaded or embedded
    if args.html:
        from .search import is_search_page

        check_output_file(args.html, "--html")
        refuse_foreign_file(args.html, "--html", is_search_page, "a page harma-fast search wrote")
    require_dir(args.images, "--images")
    require_modules(("onnxruntime",), "search")

    from .runtime import OrtEncoder
    from .search import GalleryIndex, shown, truncation_warning, write_html

    encoder = OrtEncoder(args.onnx)
    encoder.require_text()  # before the whole folder is embedded and indexed
    warning = truncation_warning(encoder, query)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    index = GalleryIndex(args.images, encoder, args.index, progress=True)
    print(index.status, file=sys.stderr)
    for name, why in index.skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    hits = index.search(query, args.top_k)
    print(f"rank, cosine similarity of image and query, image ({len(hits)} of {len(index.names)})", file=sys.stderr)
    for hit in hits:
        print(f"{hit.rank:>3}  cos {hit.score:+.4f}  {shown(hit.path)}")
    if args.html:
        write_html(args.html, query, hits)
        print(f"wrote {args.html}", file=sys.stderr)
    return 0
