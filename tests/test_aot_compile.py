"""The Triton kernels compile for the GPUs they are tuned for, proven without a GPU (issue 21, item 4).

The interpreter tests (tests/test_attention.py and the others) prove what the kernels compute; they cannot tell
whether the compiled kernel fits a GPU: its shared memory, its registers. Compiling needs no GPU, only Triton's
compiler and the ptxas its wheel ships: `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`. What
to compile is the hard part, since every launch specialises the kernel: the tiles `_tiles` / `_blocks` pick from N,
D and the dtype, num_warps, num_stages, the constexpr flags, and the JIT's own specialisation of the other
arguments (an int equal to 1 becomes a constant; a pointer or int divisible by 16 gets a `tt.divisibility` hint,
which lets the compiler vectorise loads and changes the register count). So this file:

1. runs the real launchers at the real shapes: the ViT-S backbone (`vit_small`, 6 heads of 64, D = 384) forward and
   backward on a DINO step's crops (2 x 224 px global and 8 x 96 px local crops per image, ViT-S/16 at 128 images,
   ViT-S/8 at 32: N = 197, 785, 37, 145 tokens) under bf16 / fp16 autocast or in fp32, the DINO loss on its
   (ncrops x B, 65536) logits, and the public functions the model does not reach that way. The tensors are
   FakeTensors (torch's shape-only tensors: no memory, no arithmetic), and every kernel is replaced by a recorder
   that keeps the launch (arguments, constexprs, num_warps, num_stages) and runs nothing;
2. compiles each distinct launch ahead of time for sm_90 (H100 / H200) and sm_80 (A100) in a subprocess without
   TRITON_INTERPRET (the interpreter turns every @triton.jit function into an InterpretedFunction, which the
   compiler refuses as a callee), specialised by the JIT's own binder (`create_function_from_signature` and
   `JITFunction._pack_args`, what `JITFunction.run` calls before it compiles) on stand-ins whose data_ptr() is a
   512-byte aligned allocation (CUDA's caching allocator) plus the tensor's real byte offset;
3. asserts that each compiles, that its shared memory fits the GPU, and that ptxas spilled no registers (but for
   the measured and argued exceptions of SPILL_ALLOWED, below). The register and spill numbers are ptxas's own
   report of the very compile that made the cubin (TRITON_DUMP_PTXAS_LOG=1, Triton 3.6-3.9); the compiled
   kernel's `n_regs` / `n_spills` are only filled in by `_init_handles`, which loads it through a CUDA driver.
   The compiler's cache goes to a temporary directory, deleted afterwards.

Default: sm_90, bf16 autocast (fp32 for the DINO loss, whose logits DINOHead keeps in fp32), the four DINO shapes.
`MINIVIT_AOT_FULL=1`: sm_80 and sm_90, bf16, fp16 and fp32, plus the offline GPU preset's shapes, the launchers the
model does not call (patch_embed alone, bias_gelu alone, the blocked attention backward forced at N = 37 as
bench/bench_kernels.py runs it), attention with ViT-H's heads of 80 (_tiles' D > 64 branch) and 16-bit DINO logits.
The table of what was measured (bench/NOTES.md section 8):

    python tests/test_aot_compile.py [--full]     # markdown table of registers, spills, shared memory per launch
"""
import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FULL = os.environ.get("MINIVIT_AOT_FULL", "0") == "1"
KERNEL_MODULES = ["attention", "patch_embed", "layernorm", "bias_gelu", "dino_loss"]  # in minivit/kernels/

# Streaming multiprocessors, which size some grids and so the rows per program, an int argument the JIT may mark
# divisible by 16: H100 SXM and H200 have 132, A100 108.
SMS = {90: 132, 80: 108}
# Shared memory one program may claim (the opt-in maximum per block): H100 / H200 227 KB, A100 163 KB. Consumer
# GPUs (sm_86 / sm_89: RTX 30xx / 40xx) have 99 KB; Triton lowers them through the same capability-8 passes as
# sm_80 (their attention compiles claim the very bytes of sm_80's, checked once), so every sm_80 compile is also
# held to 99 KB.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
CONSUMER_SHARED_LIMIT = 99 * 1024
# Register spills allowed: none, except these, each measured (Triton 3.6 and 3.9, sm_80 and sm_90) and argued. An
# entry matches a compile by kernel, the constexprs given and the dtype of the kernel's first pointer (its input);
# the bound is in bytes of ptxas's spill stores or loads per thread, whichever is larger. "spill outside the loop":
# where the stores (STL) and loads (LDL) sit in the SASS (`CompiledKernel.asm["sass"]`) against the loop's back branch.
SPILL_ALLOWED = [
    # The dK/dV kernel at its long-sequence tile (32 queries x 128 keys, 4 warps; N = 197 and 785, 16-bit): dK and
    # dV of 128 keys in fp32 are 2 x 128 x 64 x 4 B / 128 threads = 128 registers a thread before k, v and the
    # recomputed (128, 32) P^T and dP^T, so ptxas caps it at 255 and spills. Triton 3.6 (the GPU machine's): 20 B
    # on sm_90 / 16-24 B on sm_80, outside the query loop; Triton 3.9: 56 B / 68 B, 9 / 12 reloads inside it (and
    # on sm_80 11 stores). It stays: bench/tune_attention.py's H200 sweep (Triton 3.6, bench/NOTES.md section 5)
    # timed this tile fastest at both N (0.317 / 0.683 ms) in a build that spilled 12 B the same way (the kernel
    # before delta moved in);
    # 8 warps spill nothing (173 registers on sm_90) but then one 256-thread program fills an SM's 64K registers
    # where two of 128 threads did, and they lost that sweep; (32, 64) spills nothing and was 0.3% / 1.6% slower.
    # 128 B is twice the largest spill: past it the kernel is a different one, to be timed again on a GPU.
    ("_attn_bwd_dkdv_kernel", {"BLOCK_M": 32, "BLOCK_N": 128}, ("*bf16", "*fp16"), 128),
    # The one-tile backward in fp32 at 32 tokens x 64 (N = 17..32, e.g. the offline GPU preset's 32 px crops at /8
    # with --precision fp32): 255 registers and 12-20 B on sm_90 (none on sm_80), all outside any loop: the kernel
    # has none, so each spilled value is stored and loaded once per thread. 8 warps would spill nothing (170
    # registers) at one program per SM instead of two; not worth a blind change for 20 B.
    ("_attn_bwd_tile_kernel", {"BLOCK": 32, "BLOCK_D": 64}, ("*fp32",), 32),
    # The fp32 forward at D = 80-128 (ViT-H heads, --precision fp32): 20 B on sm_80 with Triton 3.9 only (none on
    # sm_90, none with 3.6), one store and two reloads inside the key loop; its neighbours spill far more
    # ((64, 32, 8, 1) and (32, 32, 4, 2) 700-1100 B on sm_90), so the tile stays.
    ("_attn_fwd_kernel", {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 128}, ("*fp32",), 32),
    # Known, not fixed here: the patch embedding's exact-fp32 forward ("ieee" dots on CUDA cores, the operands in
    # registers; --precision fp32, not the speed path) runs the 16-bit 128 x 128 tile of patch_embed.py's BLOCKS
    # with 2 stages: 255 registers and 8-20 B with Triton 3.9 (none with 3.6). fp32 tiles chosen from this test's
    # report, as attention.py's _tiles does, are owed (bench/NOTES.md section 8).
    ("_patch_embed_fwd_kernel", {"PRECISION": "ieee"}, ("*fp32",), 32),
    # The image gradient, which no training step launches (images need no gradient): 16-bit at patch 8 80 B
    # (Triton 3.6, sm_90), fp32 12-16 B (Triton 3.9, sm_90). Owed with the above.
    ("_patch_embed_dx_kernel", {}, ("*fp32", "*bf16", "*fp16"), 128),
]


def _spill_bound(r):
    """Bytes of spill one compile result may show (SPILL_ALLOWED), 0 unless an entry matches."""
    for kernel, when, dtypes, bound in SPILL_ALLOWED:
        if (r["kernel"] == kernel and r["input_dtype"] in dtypes
                and all(r["constexprs"].get(k) == v for k, v in when.items())):
            return bound
    return 0


# ----------------------------------------------------------------------------------------------------------------
# 1. Capture: the real launchers on FakeTensors, each kernel launch recorded instead of run.

# The DINO step of bench/bench.py and bench/NOTES.md: 2 global + 8 local crops per image, K = 65536 prototypes.
# (name, patch size, images per GPU, global px, local px, local crops, K)
DINO_RUNS = [("ViT-S/16 DINO b128", 16, 128, 224, 96, 8, 65536), ("ViT-S/8 DINO b32", 8, 32, 224, 96, 8, 65536)]
# train_dino.py's OFFLINE_GPU preset (no --data on a GPU): ViT-S/8, 64 px global / 32 px local crops (N = 65, 17),
# 6 local crops, 128 images, K = 1024
OFFLINE_GPU_RUN = ("ViT-S/8 offline GPU preset b128", 8, 128, 64, 32, 6, 1024)
PRECISIONS = ["bf16", "fp16", "fp32"]


def _describe(value):
    """A launch argument as JSON: a tensor by its dtype and byte offset into its allocation (what the JIT's
    alignment specialisation reads through data_ptr()), anything else as it is."""
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."),
                "offset": value.storage_offset() * value.element_size()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"unexpected kernel argument {type(value).__name__}: teach _describe about it")


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` appends the launch to `launches` and
    runs nothing (the FakeTensors have no memory to run on; the outputs stay garbage, which nothing reads)."""

    def __init__(self, module, name, launches, context):
        self.module, self.name, self.launches, self.context = module, name, launches, context

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append({
                "module": self.module, "kernel": self.name, "context": self.context[0],
                "args": [_describe(a) for a in args], "kwargs": kwargs})
        return launch


@contextlib.contextmanager
def _recording(sms):
    """Every kernel of minivit.kernels recorded; the launchers choose as on a GPU with `sms` SMs: GPU tiles (not
    the interpreter's), no interpreter upcasts, Triton path for the (CPU) FakeTensors."""
    import importlib

    import minivit.kernels as kernels

    launches, context = [], [""]
    with contextlib.ExitStack() as stack:
        patch = lambda obj, name, value: stack.enter_context(mock.patch.object(obj, name, value))  # noqa: E731
        patch(kernels, "num_sms", lambda x: sms)  # split_rows reads it (layernorm, bias_gelu backward)
        for name in KERNEL_MODULES:
            module = importlib.import_module(f"minivit.kernels.{name}")
            for attr in dir(module):
                if attr.endswith("_kernel") and hasattr(getattr(module, attr), "fn"):
                    patch(module, attr, _Recorder(module.__name__, attr, launches, context))
            patch(module, "interpreter_on", lambda: False)
            patch(module, "use_triton", lambda x: True)
            if hasattr(module, "num_sms"):
                patch(module, "num_sms", lambda x: sms)
        # patch_embed's _dw_split counts 4 SMs off a GPU: that changes its grid and rows_per_split, always a
        # multiple of BLOCK_M = 32, so never the compiled kernel
        yield launches, context


def _autocast(precision):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _vit_small_meta(patch):
    """ViT-S (D = 384, 12 blocks of 6 heads of 64) on the meta device: no memory, no init arithmetic (which fake
    tensors refuse: trunc_normal_ asks for a value). `.to_empty(device="cpu")` under FakeTensorMode makes it fake."""
    import torch

    from minivit.vit import vit_small

    with torch.device("meta"):
        return vit_small(patch_size=patch, img_size=224)


def _backward(y):
    """Backward from y with a dense gradient of y's shape and dtype, as the next layer's backward hands one over.
    Not y.sum().backward(): its gradient is an expanded tensor with all strides 0, which the JIT would specialise
    as constants and divisible ints, compiling a kernel no training step runs."""
    import torch

    y.backward(torch.empty_like(y, memory_format=torch.contiguous_format))


def _dino_step(context, models, run, precision, loss=True):
    """One DINO step's kernel launches: the student backbone forward + backward on the global and the local crops
    (the teacher's forward on the global crops launches the same forward kernels), the loss forward + backward."""
    import torch

    from minivit.kernels.dino_loss import dino_loss

    name, patch, batch, global_px, local_px, n_local, K = run
    model = models[patch]  # fp32 parameters, also under autocast, as in training: LayerNorm reads fp32 gamma, beta
    for px, images in ((global_px, 2 * batch), (local_px, n_local * batch)):
        N = (px // patch) ** 2 + 1
        context[0] = f"{name} {precision}: {images} x {px} px crops (N = {N})"
        with _autocast(precision):
            features = model(torch.empty(images, 3, px, px))
        _backward(features)  # what DINOHead's first Linear hands back (the head itself runs in fp32, no kernel)
    if loss:
        ncrops = 2 + n_local
        context[0] = f"{name}: DINO loss, student ({ncrops * batch}, {K}) fp32"
        student = torch.empty(ncrops * batch, K, requires_grad=True)
        dino_loss(student, torch.empty(2 * batch, K), torch.empty(1, K), ncrops, 0.1, 0.04).backward()


def _direct(context, precision):
    """The public launchers the DINO step does not reach: patch_embed (plain patch tokens, and the image gradient),
    bias_gelu alone, the blocked attention backward forced at N = 37 (bench/bench_kernels.py times it there), and
    attention with ViT-H's heads of 80 (padded to 128: _tiles' other branch) at 224 px /14 (N = 257) and N = 37."""
    import torch

    from minivit.kernels.attention import _attn_backward, _attn_forward, attention
    from minivit.kernels.bias_gelu import bias_gelu
    from minivit.kernels.patch_embed import patch_embed

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    for patch in (16, 8):
        context[0] = f"patch_embed {precision}: 256 x 224 px, patch {patch}, image gradient too"
        x = torch.empty(256, 3, 224, 224, requires_grad=True)
        w, b = torch.empty(384, 3, patch, patch, requires_grad=True), torch.empty(384, requires_grad=True)
        with _autocast(precision):
            y = patch_embed(x, w, b)
        _backward(y)
    context[0] = f"bias_gelu {precision}: (256 x 197, 1536)"
    h = torch.empty(256, 197, 1536, dtype=dtype, requires_grad=True)
    _backward(bias_gelu(h, torch.empty(1536, dtype=dtype, requires_grad=True)))
    context[0] = f"attention {precision}: (1024, 6, 37, 64), blocked backward forced"
    qkv = torch.empty(1024, 37, 3, 6, 64, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    o, lse = _attn_forward(q, k, v, 0.125)
    _attn_backward(q, k, v, o, lse, torch.empty_like(o), 0.125, path="blocks")
    for B, N in ((64, 257), (256, 37)):
        context[0] = f"attention {precision}: ViT-H heads ({B}, 16, {N}, 80)"
        qkv = torch.empty(B, N, 3, 16, 80, dtype=dtype, requires_grad=True)
        o = attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0))
        _backward(o.transpose(1, 2).reshape(B, N, 16 * 80))  # the heads concatenated, as the ViT's proj reads them


def _dino_loss_16bit(context, precision):
    """dino_loss also takes 16-bit logits (DINOHead gives fp32 ones): the ViT-S/16 DINO shape in bf16 / fp16."""
    import torch

    from minivit.kernels.dino_loss import dino_loss

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    context[0] = f"DINO loss {precision} logits: student (1280, 65536)"
    student = torch.empty(1280, 65536, dtype=dtype, requires_grad=True)
    dino_loss(student, torch.empty(256, 65536, dtype=dtype), torch.empty(1, 65536), 10, 0.1, 0.04).backward()


def capture(arch, full):
    """-> the kernel launches of the sweep, as recorded for a GPU of `arch` (its SM count)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    meta = {patch: _vit_small_meta(patch) for patch in (16, 8)}
    with _recording(SMS[arch]) as (launches, context), FakeTensorMode(allow_non_fake_inputs=True):
        models = {patch: model.to_empty(device="cpu") for patch, model in meta.items()}
        if not full:
            for run in DINO_RUNS:
                _dino_step(context, models, run, "bf16", loss=run is DINO_RUNS[0])  # the loss kernels: one shape
            _direct_patch_embed_dx(context)
            return launches
        for precision in PRECISIONS:
            for run in DINO_RUNS + [OFFLINE_GPU_RUN]:
                _dino_step(context, models, run, precision, loss=precision == "fp32")
            _direct(context, precision)
            if precision != "fp32":
                _dino_loss_16bit(context, precision)
    return launches


def _direct_patch_embed_dx(context):
    """The default sweep's one launch outside the DINO step: the patch embedding's image gradient (the DINO step's
    images need none), bf16, ViT-S/16."""
    import torch

    from minivit.kernels.patch_embed import patch_embed

    context[0] = "patch_embed bf16: 256 x 224 px, patch 16, image gradient"
    x = torch.empty(256, 3, 224, 224, requires_grad=True)
    with _autocast("bf16"):
        y = patch_embed(x, torch.empty(384, 3, 16, 16), torch.empty(384))
    _backward(y)


# ----------------------------------------------------------------------------------------------------------------
# 2. Compile (in a subprocess without TRITON_INTERPRET): specialise as the JIT does, compile, read ptxas's report.

_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


class _Pointer:
    """A tensor as the JIT's specialisation sees it: a dtype and a data_ptr(). CUDA's caching allocator hands out
    512-byte aligned blocks, so a tensor's address modulo 16 is its byte offset's."""

    def __init__(self, dtype, offset):
        self.dtype, self.offset = dtype, offset

    def data_ptr(self):
        return 2 ** 32 + self.offset


def _specialise(jit_fn, backend, args, kwargs):
    """(options, signature, constexprs, attrs) exactly as JITFunction.run builds them (Triton 3.6-3.9)."""
    import torch
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    args = [_Pointer(getattr(torch, a["tensor"]), a["offset"]) if isinstance(a, dict) else a for a in args]
    kwargs = dict(kwargs)
    # JITFunction.run adds these before binding (the last two from Triton 3.6 / 3.9 on)
    kwargs["debug"] = kwargs.get("debug", jit_fn.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    return jit_fn._pack_args(backend, kwargs, bound_args, specialization, options)


def _ptxas_rerun(kernel, arch, options):
    """ptxas -v on the kernel's PTX: the fallback where Triton cannot print its own ptxas log."""
    from triton.backends.nvidia import compiler as nv

    ptxas = nv.get_ptxas(arch).path if hasattr(nv, "get_ptxas") else os.path.join(
        os.path.dirname(nv.__file__), "bin", "ptxas")
    gpu = nv.sm_arch_from_capability(arch) if hasattr(nv, "sm_arch_from_capability") else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        fmad = [] if getattr(options, "enable_fp_fusion", True) else ["--fmad=false"]
        return subprocess.run([ptxas, "-v", "-lineinfo", *fmad, f"--gpu-name={gpu}", src, "-o", src + ".o"],
                              capture_output=True, text=True, check=True).stderr


def compile_launches(launches, arch):
    """Compile each distinct launch for sm_`arch` -> one result per distinct compile, with every context it serves."""
    import importlib
    import warnings

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")  # 3.9: fusion stays on, as in the JIT
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    results = {}
    for launch in launches:
        jit_fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        options, signature, constexprs, attrs = _specialise(jit_fn, backend, launch["args"], launch["kwargs"])
        key = (launch["kernel"], str(signature), str(sorted(constexprs.items())), str(sorted(attrs.items())),
               options.hash())
        if key in results:
            if launch["context"] not in results[key]["contexts"]:
                results[key]["contexts"].append(launch["context"])
            continue
        names = [p.name for p in jit_fn.params]
        result = results[key] = {
            "kernel": launch["kernel"], "arch": arch, "contexts": [launch["context"]],
            "constexprs": {k: v for k, v in launch["kwargs"].items() if k not in ("num_warps", "num_stages")},
            "num_warps": options.num_warps, "num_stages": options.num_stages,
            "input_dtype": str(signature[names[0]]),
            "dtypes": sorted({signature[n] for n in names if str(signature[n]).startswith("*")}),
            # the pointers and ints the JIT did not mark divisible by 16 (floats never are): what tells two
            # launches of one configuration apart
            "not_divisible": [n for i, n in enumerate(names) if str(signature[n])[:1] in "*iu"
                              and not attrs.get((i,))],
        }
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1: make_cubin prints ptxas's report
                kernel = triton.compile(triton.compiler.ASTSource(fn=jit_fn, signature=signature,
                                                                  constexprs=constexprs, attrs=attrs),
                                        target=target, options=options.__dict__)
        except Exception as error:  # noqa: BLE001 -- reported per launch by the test
            result["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
            continue
        report = log.getvalue()
        if not _PTXAS_USED.search(report):
            report = _ptxas_rerun(kernel, arch, options)
        used, spills = _PTXAS_USED.search(report), _PTXAS_SPILLS.search(report)
        result.update(shared=kernel.metadata.shared, registers=int(used.group(1)),
                      stack=int(spills.group(1)), spill_stores=int(spills.group(2)), spill_loads=int(spills.group(3)))
    return list(results.values())


JOBS = int(os.environ.get("MINIVIT_AOT_JOBS", "2"))  # compile processes in all (the machine has 2 cores)


def run_sweep(full=FULL, archs=None, jobs=JOBS):
    """Capture here, compile in subprocesses (`jobs` in all, split by arch, then by kernel) -> results, all archs."""
    archs = archs or ([90, 80] if full else [90])
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=os.path.join(tmp, "cache"), TRITON_DUMP_PTXAS_LOG="1", PYTHONWARNINGS="ignore")
        for arch in archs:
            launches = capture(arch, full)
            # a kernel's launches stay in one process, which compiles each distinct one once
            kernels = sorted({launch["kernel"] for launch in launches})
            chunks = max(1, jobs // len(archs))
            for c in range(chunks):
                mine = set(kernels[c::chunks])
                path = os.path.join(tmp, f"sm{arch}-{c}")
                with open(path + ".in.json", "w") as f:
                    json.dump([launch for launch in launches if launch["kernel"] in mine], f)
                with open(path + ".log", "w") as log:
                    procs.append((arch, path, subprocess.Popen(
                        [sys.executable, os.path.abspath(__file__), "--compile", str(arch), path],
                        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)))
        results = []
        for arch, path, proc in procs:
            if proc.wait(timeout=1800) != 0:
                with open(path + ".log") as f:
                    raise RuntimeError(f"the sm_{arch} compile worker failed (exit {proc.returncode}):\n"
                                       f"{f.read()[-5000:]}")
            with open(path + ".out.json") as f:
                results += json.load(f)
    return results


def _config(r):
    flags = " ".join(f"{k}={v}" for k, v in r["constexprs"].items())
    return (f"{flags} num_warps={r['num_warps']} num_stages={r['num_stages']} {'/'.join(r['dtypes'])}; "
            f"not divisible by 16: {', '.join(r['not_divisible']) or 'none'}")


def check(r):
    """-> the problems of one compile result, each a sentence naming the kernel, configuration, arch and numbers."""
    where = f"{r['kernel']} [{_config(r)}] on sm_{r['arch']} (launched by: {'; '.join(r['contexts'])})"
    if "error" in r:
        return [f"{where} does not compile: {r['error']}"]
    problems = []
    limit = SHARED_LIMIT[r["arch"]]
    if r["shared"] > limit:
        problems.append(f"{where} needs {r['shared']} B of shared memory, over the {limit} B of sm_{r['arch']}")
    if r["arch"] == 80 and r["shared"] > CONSUMER_SHARED_LIMIT:
        problems.append(f"{where} needs {r['shared']} B of shared memory, over the {CONSUMER_SHARED_LIMIT} B of "
                        "consumer GPUs (sm_86 / sm_89)")
    bound = _spill_bound(r)
    if max(r["spill_stores"], r["spill_loads"]) > bound:
        problems.append(f"{where} spills registers: {r['registers']} registers, {r['spill_stores']} B spill stores, "
                        f"{r['spill_loads']} B spill loads, {r['stack']} B stack frame (allowed: {bound} B)")
    return problems


def table(results):
    """Markdown: one row per kernel configuration, sm_90 and sm_80 side by side."""
    rows = {}
    for r in results:
        key = (r["kernel"], _config(r), "; ".join(sorted(set(r["contexts"]))))
        rows.setdefault(key, {})[r["arch"]] = r
    lines = ["| kernel | configuration | sm_90 regs / spill B / shared KB | sm_80 regs / spill B / shared KB |"
             " launched by |", "|---|---|---|---|---|"]

    def cell(r):
        if r is None:
            return ""
        if "error" in r:
            return "does not compile"
        spill = f"{r['spill_stores']}/{r['spill_loads']}" if r["spill_stores"] or r["spill_loads"] else "0"
        return f"{r['registers']} / {spill} / {r['shared'] / 1024:.1f}"

    for (kernel, config, contexts), by_arch in sorted(rows.items()):
        lines.append(f"| {kernel} | {config} | {cell(by_arch.get(90))} | {cell(by_arch.get(80))} | {contexts} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# 3. The tests.

if __name__ != "__main__":
    import pytest

    def _have_compiler():
        """None when triton.compile and ptxas can run here, else why not."""
        try:
            import triton
            from triton.backends.nvidia import compiler as nv
            from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
        except ImportError as error:
            return f"no Triton with an NVIDIA backend ({error})"
        if not hasattr(triton, "compile") or not hasattr(JITFunction, "_pack_args"):
            return f"Triton {triton.__version__} has no triton.compile / JITFunction._pack_args"
        try:
            ptxas = nv.get_ptxas(90).path if hasattr(nv, "get_ptxas") else None
        except Exception as error:  # noqa: BLE001 -- knobs raise when the binary is missing
            return f"no ptxas ({error})"
        if ptxas is not None and not os.access(ptxas, os.X_OK):
            return f"ptxas {ptxas} is not executable"
        return None

    ARCHS = [90, 80] if FULL else [90]
    KERNELS = ["_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_tile_kernel",
               "_patch_embed_fwd_kernel", "_patch_embed_dx_kernel", "_patch_embed_dw_kernel", "_add_ln_fwd_kernel",
               "_add_ln_bwd_kernel", "_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel", "_row_lse_kernel",
               "_dino_ce_kernel"]

    @pytest.fixture(scope="module")
    def sweep():
        reason = _have_compiler()
        if reason:
            pytest.skip(f"cannot compile for a GPU here: {reason}")
        return run_sweep(FULL, ARCHS)

    @pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
    @pytest.mark.parametrize("kernel", KERNELS)
    def test_kernel_compiles_and_fits(sweep, kernel, arch):
        """Every launch of `kernel` in the sweep compiles for sm_`arch`, fits its shared memory, spills nothing."""
        results = [r for r in sweep if r["kernel"] == kernel and r["arch"] == arch]
        assert results, f"{kernel}: no launch captured for sm_{arch}: the sweep no longer reaches this kernel"
        problems = [p for r in results for p in check(r)]
        assert not problems, "\n".join(problems)

    def test_sweep_reaches_both_backward_paths_and_tiles(sweep):
        """The real N decide the tiles: the sweep must hold both attention backward paths and both 16-bit tile
        sets of _tiles (N <= 160 and longer), or it checks less than it says."""
        seen = {(r["kernel"], r["constexprs"].get("BLOCK_M"), r["constexprs"].get("BLOCK_N"))
                for r in sweep if r["kernel"].startswith("_attn")}
        for expected in [("_attn_bwd_tile_kernel", None, None), ("_attn_fwd_kernel", 128, 64),
                         ("_attn_fwd_kernel", 64, 32), ("_attn_bwd_dkdv_kernel", 32, 128),
                         ("_attn_bwd_dkdv_kernel", 32, 64), ("_attn_bwd_dq_kernel", 128, 32),
                         ("_attn_bwd_dq_kernel", 64, 32)]:
            assert expected in seen, f"no attention launch {expected} in the sweep; seen: {sorted(seen, key=str)}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the MINIVIT_AOT_FULL=1 sweep")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results there")
    parser.add_argument("--compile", nargs=2, metavar=("ARCH", "PATH"), help=argparse.SUPPRESS)  # the worker
    cli = parser.parse_args()
    if cli.compile:
        arch, path = int(cli.compile[0]), cli.compile[1]
        with open(path + ".in.json") as f:
            todo = json.load(f)
        with open(path + ".out.json", "w") as f:
            json.dump(compile_launches(todo, arch), f)
    else:
        import triton

        found = run_sweep(cli.full or FULL)
        if cli.json:
            with open(cli.json, "w") as f:
                json.dump(found, f, indent=1)
        print(f"Triton {triton.__version__}, {len(found)} compiles\n")
        print(table(found))
        bad = [p for r in found for p in check(r)]
        print("\n" + ("\n".join(bad) if bad else "all compile, fit and spill nothing beyond SPILL_ALLOWED"))
