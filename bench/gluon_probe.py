"""Does Triton's Gluon dialect compile what a producer-warp forward needs, for sm_90, here?

A probe for the next step named in bench/RESULTS.md (nineteenth session): a program that
keeps its next K tiles on their way while it computes needs explicit shared memory, TMA copies
signalled by mbarriers, warpgroup MMA and a warp-specialised loader -- which Triton's ``tl``
language cannot say and its Gluon dialect can. This compiles the smallest kernel with all
four (a 1-warp partition streaming K tiles through a two-slot ring, the 4-warp default
partition taking S = Q K^T per tile and a softmax-like reduction of it) ahead of time for an
H100, without a GPU, and prints what its SASS holds.

    pip download triton==3.6.0 --no-deps -d /tmp/tr36 && unzip -q /tmp/tr36/*.whl -d /tmp/tr36/x
    PYTHONPATH=/tmp/tr36/x python bench/gluon_probe.py

Written against Triton 3.6, the GPU machine's: Gluon's API moves between releases (3.9
renamed ``tma.async_copy_global_to_shared`` to ``async_load``), so a Gluon kernel in the
package would have to be pinned to the Triton it runs with. Not a kernel of the package.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU (before triton's import)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma  # noqa: E402

from sass_loops import main_loops, sass_of  # noqa: E402


@gluon.jit
def _loader(q_desc, k_desc, bars, q_smem, k_smem, n_tiles):
    """The producer: Q once, then K tiles into the ring as slots free up."""
    mbarrier.expect(bars.index(0), q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [0, 0], bars.index(0), q_smem)
    for i in range(n_tiles):
        slot = i % 2
        phase = (i // 2) & 1
        # Barriers start with phase 1 complete: the first pass over each slot does not wait.
        mbarrier.wait(bars.index(3 + slot), phase ^ 1)
        mbarrier.expect(bars.index(1 + slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [i * 64, 0], bars.index(1 + slot), k_smem.index(slot))


@gluon.jit
def _compute(bars, q_smem, k_smem, out_ptr, n_tiles):
    """The consumer: one wgmma per K tile, the slot handed back as soon as it is read."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    acc = gl.zeros([64, 64], gl.float32, mma)
    mbarrier.wait(bars.index(0), 0)
    for i in range(n_tiles):
        slot = i % 2
        mbarrier.wait(bars.index(1 + slot), (i // 2) & 1)
        s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), gl.zeros([64, 64], gl.float32, mma))
        mbarrier.arrive(bars.index(3 + slot), count=1)
        acc = acc + gl.exp2(s - gl.max(s, axis=1)[:, None])
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, mma))
    cols = gl.arange(0, 64, layout=gl.SliceLayout(0, mma))
    gl.store(out_ptr + rows[:, None] * 64 + cols[None, :], acc)


@gluon.jit
def _probe(q_desc, k_desc, out_ptr, n_tiles):
    # 64x64 tiles; mbarriers: 0 Q has landed, 1 + i K slot i is full, 3 + i K slot i is free.
    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2] + k_desc.block_type.shape, k_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [5, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(5):
        mbarrier.init(bars.index(i), count=1)
    gl.warp_specialize([(_compute, (bars, q_smem, k_smem, out_ptr, n_tiles)),
                        (_loader, (q_desc, k_desc, bars, q_smem, k_smem, n_tiles))], [1], [24])


def main() -> None:
    shared = "NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)"
    desc = f"tensordesc<bf16[64, 64],{shared}>"
    signature = {"q_desc": desc, "k_desc": desc, "out_ptr": "*fp32", "n_tiles": "i32"}
    kernel = triton.compile(GluonASTSource(_probe, signature, {}), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 4})
    sass = sass_of(kernel.asm["cubin"])
    print(f"triton {triton.__version__}: compiled for sm_90; HGMMA {sass.count('HGMMA')}, "
          f"UTMALDG {sass.count('UTMALDG')}, SYNCS {sass.count('SYNCS')}, shared {kernel.metadata.shared} bytes")
    for loop in main_loops(sass, min_products=1):
        print(f"  loop with {loop['products']} products: {loop['full_path']} instructions on its full path")


if __name__ == "__main__":
    main()
