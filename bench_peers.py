"""Time qwen3_minimal.py beside transformers and the book's package, int8 and compiled rows included.

Runs the shared harness (../shared/bench/peers.py: same random 0.6B-shaped weights for every
implementation, prefill of a 128-token prompt, 64 greedy KV-cache tokens) with two more rows of
ours in the same process, so that their ratios come from one run:
  ours.int8     quantize_int8(model) after the shared weights are filled in
  ours.compile  generate_text_basic_cache(..., compile=True)

    OMP_NUM_THREADS=2 python bench_peers.py --dtypes bfloat16            # about 5 minutes
    OMP_NUM_THREADS=2 python bench_peers.py --dtypes float32 --no-compile  # greedy tokens vs transformers
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default=str(HERE.parent / "shared" / "bench" / "peers.py"), help="path to peers.py")
    ap.add_argument("--dtypes", default="bfloat16")
    ap.add_argument("--impls", default="hf.generate,rfs", help="peer rows (see peers.py --impls)")
    ap.add_argument("--no-compile", action="store_true", help="skip the ours.compile row")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, seconds")
    ap.add_argument("--json", help="save the results; merge runs with: python PEERS --report a.json,b.json")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(args.peers).resolve().parent))
    import peers

    torch.set_num_threads(2)
    arch = peers.ARCH_SMOKE if args.smoke else peers.ARCH_06B
    print(peers.cpu_info())
    bandwidth = peers.quick_read_bw(0.25 if args.smoke else 1.0)
    ours = peers.make_ours_impl(str(HERE / "qwen3_minimal.py"))
    module = sys.modules["qwen3_minimal_under_test"]
    Ours = type(ours)

    class OursInt8(Ours):
        name = "ours.int8"

        def tie(self, model):  # called once the shared weights are in: quantize those
            super().tie(model)
            module.quantize_int8(model)

    class OursCompiled(Ours):
        name = "ours.compile"

        @torch.inference_mode()
        def generate(self, model, ids, n_new):
            return module.generate_text_basic_cache(model, ids, n_new, compile=True)

    registry = {"hf.generate": peers.HFGenerate, "hf.loop": peers.HFLoop, "rfs": peers.RFS, "rfs_opt": peers.RFSOpt}
    impls = [registry[name]() for name in args.impls.split(",") if name] + [ours, OursInt8()]
    if not args.no_compile:
        impls.append(OursCompiled())
    ids = torch.randint(0, arch["vocab"], (1, 128), generator=torch.Generator().manual_seed(7))
    results, start = [], time.perf_counter()
    for dtype_name in args.dtypes.split(","):
        for impl in impls:
            result = peers.bench_impl(impl, arch, getattr(torch, dtype_name), ids, 64, 3, 0)
            result["cpu_pressure_after"] = peers.cpu_pressure()
            results.append(result)
            print(f"[{time.perf_counter() - start:6.1f}s] {impl.name} {dtype_name} done", flush=True)
    print(f"\nOMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, read bandwidth {bandwidth:.1f} GB/s")
    peers.print_table(results, bandwidth)
    worst = max(r["cpu_pressure_after"].get("avg60", 0.0) for r in results)
    print(f"CPU pressure (PSI some avg60, max seen): {worst:.1f}%")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"info": peers.cpu_info(), "bw_read_gbs": bandwidth, "results": results}, file, indent=1)


if __name__ == "__main__":
    main()
