"""``harma-fast export`` and ``harma-fast search``."""
from __future__ import annotations

import argparse
import sys


def add_export_parsers(sub) -> None:
    p = sub.add_parser("export", help="export the (adapted) encoders to ONNX, checked against PyTorch")
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture")
    p.add_argument("--pretrained", help="backbone weights: local file or cached tag")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapters", help="adapter file (.safetensors) from training")
    src.add_argument("--released", help="checkpoint of the released HarMA code (backbone + adapters)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--towers", nargs="+", default=["image", "text"], choices=["image", "text"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "int8"],
                   help="fp32; fp16 (for the CUDA provider); int8 (dynamic int8 weights, for the CPU provider)")
    p.add_argument("--plain-onnx", action="store_true",
                   help="standard ONNX ops only (no ONNX Runtime contrib ops such as the fused Attention)")
    p.add_argument("--check-file", help="with --dtype int8: evaluation file on which int8 retrieval must match fp32's")
    p.add_argument("--image-root", help="image folder of --check-file")
    p.add_argument("--opset", type=int)
    p.add_argument("--static-batch", action="store_true", help="fix the batch axis (default: dynamic)")
    p.set_defaults(handler=run_export)

    s = sub.add_parser("search", help="search a folder of images with a caption, through the ONNX encoders")
    s.add_argument("query", help="the caption to search for")
    s.add_argument("--onnx", required=True, help="export directory (from harma-fast export)")
    s.add_argument("--images", required=True, help="folder of images (searched recursively)")
    s.add_argument("--top-k", type=int, default=10)
    s.add_argument("--html", help="also write a page with the query and the retrieved images")
    s.add_argument("--index", help="where the folder's embedding index lives (default: ~/.cache/harma_fast)")
    s.set_defaults(handler=run_search)


def run_export(args: argparse.Namespace) -> int:
    from .. import create_model, load_adapters, load_released_checkpoint
    from .onnx_export import export_onnx

    model = create_model(args.model, args.pretrained)
    if args.adapters:
        load_adapters(model, args.adapters)
    elif args.released:
        load_released_checkpoint(model, args.released)
    meta = export_onnx(model, args.out, towers=args.towers, dtype=args.dtype, opset=args.opset,
                       dynamic_batch=not args.static_batch, model_name=args.model, fused=not args.plain_onnx,
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
    from .runtime import OrtEncoder
    from .search import GalleryIndex, write_html

    encoder = OrtEncoder(args.onnx)
    index = GalleryIndex(args.images, encoder, args.index, progress=True)
    print(index.status, file=sys.stderr)
    for name, why in index.skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    hits = index.search(args.query, args.top_k)
    for hit in hits:
        print(f"{hit.rank:>3}  {hit.score:.4f}  {hit.path}")
    if args.html:
        write_html(args.html, args.query, hits)
        print(f"wrote {args.html}", file=sys.stderr)
    return 0
