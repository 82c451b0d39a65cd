"""Compile every kernel, as the launchers call it, for a GPU target — without a GPU.

    python -m harma_fast.kernels._aot [--arch 90]

The launchers are run on CPU tensors of the shapes HarMA trains at (ViT-B-32: widths 768/512,
bottleneck 128, 50/77 tokens, the shared sub-adapter at 64; the loss at D=512) with every
kernel replaced by a recorder — the variants training launches included (no LayerScale γ in
ViT-B-32, no block gate or residual in the shared sub-adapter's output op). Each recorded call
(and, for autotuned kernels, each config) is compiled with Triton's ahead-of-time path for
``cuda:<arch>`` *with the JIT's own specialisation* (the same binder decides which pointers
and integers are divisible by 16, so shared memory and registers are those of the binary a
launch would load), and ``cuobjdump`` reports registers and the stack frame, where ptxas puts
spilled registers. This catches what the interpreter cannot: shapes ``tl.dot`` rejects, type
errors, shared memory beyond the chip, register spills. CI runs it through
``tests/test_kernels_compile.py``; the check fails on spills in the bf16 (training) builds and
on shared memory beyond the chip in any build.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List

import torch

SHARED_LIMIT = 232448  # bytes a Hopper block may opt in to


class _Recorder:
    def __init__(self, kernel, calls: List):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.kernel, args, kwargs))
        return launch


def kernel_modules():
    from . import adapter_attention, adapter_down, adapter_up, retrieval_ranks, similarity_loss
    return adapter_down, adapter_up, adapter_attention, similarity_loss, retrieval_ranks


def run_launchers(dtype: torch.dtype, stub: Callable) -> None:
    """Run every launcher at HarMA's shapes with each kernel ``k`` swapped for ``stub(k)``."""
    from . import adapter_attention, adapter_down, adapter_up, retrieval_ranks, similarity_loss

    originals = {}
    for mod in kernel_modules():
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.startswith("_") and name.endswith("_kernel"):
                originals[(mod, name)] = obj
                setattr(mod, name, stub(obj))
    try:
        g = torch.Generator().manual_seed(0)
        for width, length in ((768, 50), (512, 77)):
            m = 4 * length
            h = torch.randn(m, width, generator=g).to(dtype)
            w_down, b = torch.randn(128, width).to(dtype), torch.zeros(128)
            adapter_down.down_gelu_forward(h, w_down, b)
            adapter_down.down_gelu_backward(torch.randn(m, 128).to(dtype), torch.randn(m, 128).to(dtype), h, w_down)
            gate = torch.tensor(0.6)
            z = torch.randn(m, 128).to(dtype)
            w_up = torch.randn(width, 128).to(dtype)
            hh = torch.randn(m, width).to(dtype)
            for gamma in (None, torch.ones(width)):  # the block output: without LayerScale (ViT-B-32), with it
                adapter_up.mix_up_forward(z, z, w_up, torch.zeros(width), gate, hh, gate, hh, gamma)
            adapter_up.mix_up_backward(hh, z, z, w_up, torch.zeros(width), gate, gate)
            # the shared sub-adapter's output a + mix(v, u) W₂ᵀ + b₂: no block gate, no residual, no γ
            v, a, w2 = torch.randn(m, 64).to(dtype), torch.randn(m, 128).to(dtype), torch.randn(128, 64).to(dtype)
            adapter_up.mix_up_forward(v, v, w2, torch.zeros(128), gate, a, None, None, None)
            adapter_up.mix_up_backward(a, v, v, w2, torch.zeros(128), gate, None)
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
        retrieval_ranks.count_above(feats, feats, ids, ids)
    finally:
        for (mod, name), obj in originals.items():
            setattr(mod, name, obj)


# fp32 with TF32 allowed (a user's choice: allow_tf32, set_float32_matmul_precision("high")):
# other tensor-core builds of the GEMM kernels, with shared-memory tiles of their own
TF32 = "tf32"
TF32_KERNELS = {"_down_gelu_fwd_kernel", "_mix_up_fwd_kernel", "_mix_up_bwd_kernel"}


def _record(dtype) -> List:
    calls: List = []
    from ._common import fp32_matmul

    with fp32_matmul(True) if dtype == TF32 else contextlib.nullcontext():
        run_launchers(torch.float32 if dtype == TF32 else dtype, lambda kernel: _Recorder(kernel, calls))
    return calls


def _specialise(fn, backend, args, kwargs):
    """What the JIT would compile for this call: (signature, constexprs, attrs, options).

    The JIT's own binder and argument packing: pointers whose address and integers whose
    value are multiples of 16 get ``tt.divisibility`` (vectorised, aligned accesses), an
    integer equal to 1 becomes a constant — exactly the binary a launch with these
    arguments would load (CPU tensors come from a 64-byte-aligned allocator, as CUDA's).
    """
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    """Registers and the stack frame (bytes per thread: spilled registers) from the cubin, via cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    return parse_resource_usage(text)


def parse_resource_usage(text: str) -> Dict[str, int]:
    """cuobjdump's ``REG:… STACK:… SHARED:… LOCAL:…`` line: ptxas reports spills in STACK (LOCAL stays 0)."""
    found = {key: re.search(r"\b" + key + r":(\d+)", text) for key in ("REG", "STACK", "LOCAL")}
    if found["REG"] is None or found["STACK"] is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{text}")
    return {"registers": int(found["REG"].group(1)), "stack_bytes": int(found["STACK"].group(1)),
            "local_bytes": int(found["LOCAL"].group(1)) if found["LOCAL"] else 0}


def _variant(fn, constexprs) -> Dict:
    """The constexprs that tell builds apart in the report (block sizes, head dim, optional operands)."""
    named = {fn.arg_names[k[0]] if isinstance(k, tuple) else k: v for k, v in constexprs.items()}
    shown = ("HD", "MAX_VIOLATION", "COMPUTE_DTAU")
    return {k: v for k, v in sorted(named.items()) if k.startswith(("BLOCK", "HAS_")) or k in shown}


def compile_launch(fn, args, kwargs, dtype_name: str, arch: int = 90) -> dict:
    """Compile one launch of the JIT function ``fn`` as the JIT would; its resource report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    signature, constexprs, attrs, options = _specialise(fn, make_backend(target), args, kwargs)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return {"kernel": fn.__name__, "dtype": dtype_name, "num_warps": options.num_warps,
            "num_stages": options.num_stages, "constexprs": _variant(fn, constexprs),
            "shared_bytes": compiled.metadata.shared, "wgmma": "wgmma" in compiled.asm["ptx"],
            **_resource_usage(compiled.asm["cubin"])}


def _jit(fn):
    """The JIT function (under TRITON_INTERPRET=1 the kernels are interpreted ones: specialisation
    can still be inspected, compiling needs TRITON_INTERPRET=0)."""
    from triton.runtime.jit import JITFunction
    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


def launches(dtype, only=None):
    """``(fn, args, kwargs)`` of every distinct build the launchers ask for (each autotune config
    apart); ``dtype`` a torch dtype or ``TF32`` (fp32 operands, TF32 allowed: the GEMM kernels)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.autotuner import Autotuner

    backend = make_backend(GPUTarget("cuda", 90, 32))
    seen = set()
    for kernel, args, kwargs in _record(dtype):
        fn = _jit(kernel.fn if isinstance(kernel, Autotuner) else kernel)
        if (only and fn.__name__ not in only) or (dtype == TF32 and fn.__name__ not in TF32_KERNELS):
            continue
        configs = [None]
        if isinstance(kernel, Autotuner):  # the configs the tuner would try for these arguments
            configs = kernel.configs
            if kernel.early_config_prune:
                configs = kernel.early_config_prune(configs, dict(zip(fn.arg_names, args)), **kwargs)
        for cfg in configs:
            kw = dict(kwargs, **(cfg.all_kwargs() if cfg else {}))
            kw.setdefault("num_warps", 4)
            kw.setdefault("num_stages", 3)
            kw = {k: v for k, v in kw.items() if v is not None}
            signature, constexprs, attrs, options = _specialise(fn, backend, args, kw)
            key = json.dumps([fn.__name__, signature, {str(k): v for k, v in constexprs.items()},
                              {str(k): v for k, v in attrs.items()}, options.num_warps, options.num_stages],
                             sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                yield fn, args, kw


def compile_all(arch: int = 90, dtypes=(torch.bfloat16, torch.float32, TF32), only=None, report=None) -> List[dict]:
    """Compile every recorded launch (``only``: a set of kernel names to restrict to; ``report``
    is called with each result as it comes)."""
    results = []
    for dtype in dtypes:
        for fn, args, kw in launches(dtype, only):
            results.append(compile_launch(fn, args, kw, str(dtype).replace("torch.", ""), arch))
            if report:
                report(results[-1])
    return results


def failures(results: List[dict]) -> List[str]:
    """What the check rejects: shared memory beyond the chip anywhere, spills in a bf16 build."""
    bad = []
    for r in results:
        where = f"{r['kernel']} {r['dtype']} warps={r['num_warps']} {r['constexprs']}"
        if r["shared_bytes"] > SHARED_LIMIT:
            bad.append(f"{where}: {r['shared_bytes']} B of shared memory > {SHARED_LIMIT}")
        if r["dtype"] == "bfloat16" and (r["stack_bytes"] or r["local_bytes"]):
            bad.append(f"{where}: spills {r['stack_bytes']} B of stack per thread")
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--dtype", choices=("bfloat16", "float32", TF32), action="append",
                        help="only these builds (default: all three; tf32: fp32 with TF32 allowed, GEMM kernels)")
    parser.add_argument("--kernel", action="append", help="only these kernels (default: all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    dtypes = (tuple(d if d == TF32 else getattr(torch, d) for d in args.dtype) if args.dtype
              else (torch.bfloat16, torch.float32, TF32))
    def line(r):
        print(f"{r['kernel']:<24} {r['dtype']:<9} warps={r['num_warps']} stages={r['num_stages']} "
              f"{r['constexprs']} smem={r['shared_bytes']} regs={r['registers']} "
              f"stack={r['stack_bytes']} wgmma={r['wgmma']}", flush=True)
    results = compile_all(args.arch, dtypes, set(args.kernel) if args.kernel else None,
                          report=None if args.json else line)
    if args.json:
        print(json.dumps(results))
    bad = failures(results)
    for line in bad:
        print("FAIL", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
