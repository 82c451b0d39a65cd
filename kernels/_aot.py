"""Compile every kernel, as the launchers call it, for a GPU target — without a GPU.

    python -m harma_fast.kernels._aot [--arch 90]

The launchers are run on CPU tensors of the shapes HarMA uses (ViT-B-32: widths 768/512,
bottleneck 128, 50/77 tokens; the loss at D=512) with every kernel replaced by a recorder;
each recorded call (and, for autotuned kernels, each config) is then compiled with Triton's
ahead-of-time path for ``cuda:<arch>`` and ``cuobjdump`` reports registers and local (spill) memory. This
catches what the interpreter cannot: shapes ``tl.dot`` rejects, type errors, shared memory
beyond the chip, register spills. CI runs it through ``tests/test_kernels_compile.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List

import torch

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32", torch.bool: "i1"}
SHARED_LIMIT = 232448  # bytes a Hopper block may opt in to


class _Recorder:
    def __init__(self, kernel, calls: List):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.kernel, args, kwargs))
        return launch


def _record(dtype: torch.dtype) -> List:
    """Run every launcher at HarMA's shapes with kernels swapped for recorders."""
    from . import adapter_attention, adapter_down, adapter_up, retrieval_ranks, similarity_loss

    calls: List = []
    modules = (adapter_down, adapter_up, adapter_attention, similarity_loss, retrieval_ranks)
    originals = {}
    for mod in modules:
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.startswith("_") and name.endswith("_kernel"):
                originals[(mod, name)] = obj
                setattr(mod, name, _Recorder(obj, calls))
    try:
        g = torch.Generator().manual_seed(0)
        for width, length in ((768, 50), (512, 77)):
            m = 4 * length
            h = torch.randn(m, width, generator=g).to(dtype)
            w_down, b = torch.randn(128, width).to(dtype), torch.zeros(128)
            adapter_down.down_gelu_forward(h, w_down, b)
            adapter_down.down_gelu_backward(torch.randn(m, 128).to(dtype), torch.randn(m, 128).to(dtype), h, w_down)
            for r, d in ((128, width), (64, 128)):  # the adapter's output, and S's
                z = torch.randn(m, r).to(dtype)
                w_up = torch.randn(d, r).to(dtype)
                hh = torch.randn(m, d).to(dtype)
                gate = torch.tensor(0.6)
                adapter_up.mix_up_forward(z, z, w_up, torch.zeros(d), gate, hh, gate, hh, torch.ones(d))
                adapter_up.mix_up_backward(hh, z, z, w_up, torch.zeros(d), gate, gate)
            for c, heads in ((128, 8), (64, 8)):
                qkv = torch.randn(4, length, 3 * c).to(dtype)
                out, lse = torch.randn(4, length, c).to(dtype), torch.randn(4, heads, length)
                adapter_attention.attention_forward(qkv, heads, False)
                adapter_attention.attention_backward(out, qkv, out, lse, heads, False)
        feats = torch.randn(512, 512).to(dtype)
        tau, ids = torch.tensor(0.07), torch.arange(512) // 5
        for vi in (False, True):
            similarity_loss.loss_forward(feats, feats, tau, ids, 0.2, 2.0, vi)
            stats, amax = torch.randn(6, 512), torch.zeros(2, 512, dtype=torch.int32)
            similarity_loss.loss_backward(torch.ones(2), feats, feats, tau, ids, stats, amax, 0.2, 2.0, vi)
        retrieval_ranks.count_above(feats, feats, torch.zeros(512), ids, ids)
    finally:
        for (mod, name), obj in originals.items():
            setattr(mod, name, obj)
    return calls


def _signature(fn, args, kwargs):
    names = fn.arg_names
    values = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
    signature, constexprs = {}, {}
    for p in fn.params:
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _TYPES[v.dtype]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
        else:
            signature[p.name] = "fp32"
    return signature, constexprs


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    """Registers and local (spill/stack) bytes per thread, from the cubin via Triton's cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    reg = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return {"registers": int(reg.group(1)) if reg else -1, "local_bytes": int(local.group(1)) if local else -1}


def compile_all(arch: int = 90) -> List[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.autotuner import Autotuner

    target = GPUTarget("cuda", arch, 32)
    results, seen = [], set()
    for dtype in (torch.bfloat16, torch.float32):
        for kernel, args, kwargs in _record(dtype):
            configs = kernel.configs if isinstance(kernel, Autotuner) else [None]
            fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
            for cfg in configs:
                kw = dict(kwargs, **(cfg.kwargs if cfg else {}))
                opts = {"num_warps": kw.pop("num_warps", cfg.num_warps if cfg else 4),
                        "num_stages": kw.pop("num_stages", cfg.num_stages if cfg else 3)}
                signature, constexprs = _signature(fn, args, kw)
                key = (fn.__name__, json.dumps(signature, sort_keys=True), json.dumps(constexprs, sort_keys=True,
                                                                                      default=str), str(opts))
                if key in seen:
                    continue
                seen.add(key)
                src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
                compiled = triton.compile(src, target=target, options=opts)
                ptx = compiled.asm["ptx"]
                results.append({
                    "kernel": fn.__name__, "dtype": str(dtype).replace("torch.", ""), **opts,
                    "constexprs": {k: v for k, v in constexprs.items() if k.startswith("BLOCK") or k == "HD"},
                    "shared_bytes": compiled.metadata.shared, "wgmma": "wgmma" in ptx,
                    **_resource_usage(compiled.asm["cubin"])})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    results = compile_all(args.arch)
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            print(f"{r['kernel']:<24} {r['dtype']:<9} warps={r['num_warps']} stages={r['num_stages']} "
                  f"{r['constexprs']} smem={r['shared_bytes']} regs={r['registers']} "
                  f"local={r['local_bytes']} wgmma={r['wgmma']}")
    bad = [r for r in results if r["shared_bytes"] > SHARED_LIMIT or r["local_bytes"] > 0]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
