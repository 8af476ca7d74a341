"""Read and write bandwidth of the device against working-set size: where does L2 end, and how fast is it?

Issue 4's arithmetic for the single-exp-pass compressed branch (README, "Not measured either") streams 8.5 GB of
compressed keys and values from L2 and had assumed 10 TB/s for it. Each mode here runs one Triton kernel whose
programs sweep a buffer of ``size`` bytes in 16 KiB steps, starting at different offsets so that all of the buffer is
touched evenly, ``SWEEPS`` times over (and 2 GiB at least); the bandwidth is the bytes moved over the do_bench
median. Loads use the ``.cg`` cache modifier (L2 only, no L1), as the SSA kernels' tiles are read once per program.

Modes: ``read`` (sum of loads, one float stored per program), ``write`` (stores only), ``copy`` (the buffer into a
second one of its size: twice the working set). Prints one JSON line per (mode, size) and a summary. Usage (device):
``python3 scripts/gpu/l2_bandwidth.py [--sizes-mb 4 8 16 ...]``
"""

import argparse
import json

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

STEP = 4096  # float32 values per program step: 16 KiB
SWEEPS = 8
MIN_MOVED = 2 * 2**30  # bytes per run at least, so that small buffers are not timed on the launch


@triton.jit
def _sweep_kernel(X, Y, OUT, n_steps, steps_per_program, MODE: tl.constexpr, STEP: tl.constexpr):
    """Program p moves ``steps_per_program`` consecutive 16 KiB steps from step ``p · steps_per_program`` on (modulo
    the buffer's ``n_steps``)."""
    pid = tl.program_id(0)
    offs = tl.arange(0, STEP)
    acc = tl.zeros([STEP], tl.float32)
    first = pid * steps_per_program
    for i in range(steps_per_program):
        base = ((first + i) % n_steps).to(tl.int64) * STEP
        if MODE == "read":
            acc += tl.load(X + base + offs, cache_modifier=".cg")
        elif MODE == "write":
            tl.store(Y + base + offs, offs.to(tl.float32) + i)
        else:
            tl.store(Y + base + offs, tl.load(X + base + offs, cache_modifier=".cg"))
    if MODE == "read":
        tl.store(OUT + pid, tl.sum(acc, 0))


def measure(mode: str, size: int, sms: int) -> dict:
    n_steps = max(1, size // (STEP * 4))
    x = torch.rand(n_steps * STEP, device="cuda")
    y = torch.empty_like(x)
    programs = sms * 16
    steps_per_program = max(SWEEPS * n_steps, MIN_MOVED // (STEP * 4)) // programs
    out = torch.empty(programs, device="cuda")

    def run() -> None:
        _sweep_kernel[(programs,)](x, y, out, n_steps, steps_per_program, MODE=mode, STEP=STEP, num_warps=8)

    run()
    ms = do_bench(run, warmup=50, rep=300, return_mode="median")
    moved = programs * steps_per_program * STEP * 4 * (2 if mode == "copy" else 1)
    return {"mode": mode, "size_mb": size / 2**20, "ms": ms, "gb_moved": moved / 1e9, "tb_per_s": moved / ms / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+",
                        default=[2, 4, 8, 16, 24, 32, 40, 48, 64, 128, 1024, 4096])
    parser.add_argument("--modes", nargs="+", default=["read", "write", "copy"])
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(json.dumps({"device": props.name, "sms": props.multi_processor_count,
                      "l2_mb": getattr(props, "L2_cache_size", 0) / 2**20}), flush=True)
    rows = []
    for mode in args.modes:
        for size_mb in args.sizes_mb:
            rows.append(measure(mode, int(size_mb * 2**20), props.multi_processor_count))
            print(json.dumps(rows[-1]), flush=True)
    for mode in args.modes:
        best = max((r for r in rows if r["mode"] == mode), key=lambda r: r["tb_per_s"])
        large = [r for r in rows if r["mode"] == mode and r["size_mb"] >= 1024]
        hbm = ", ".join(f"{r['tb_per_s']:.2f}" for r in large)
        print(f"{mode}: best {best['tb_per_s']:.2f} TB/s at {best['size_mb']:g} MB; ≥ 1 GB (HBM): {hbm} TB/s",
              flush=True)


if __name__ == "__main__":
    main()
