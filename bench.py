"""Benchmark qwen3_minimal.py beside transformers, the book's package and llama.cpp, in one run.

Every implementation gets the Qwen3-0.6B shape with the same random weights, a 128-token prompt
and 64 greedy new tokens, through its own generation function:
  ours          qwen3_minimal.FastGenerator, bfloat16 (and float32, int8 on CPUs); with --compile
                also FastGenerator(compile=True), bfloat16 and int8 (--max-autotune: compile="max-autotune");
                and the chapter's loop, generate_text_basic_cache, on the same model
  transformers  Qwen3ForCausalLM.generate(do_sample=False)      where transformers is installed
                (compiled: with its static cache, which it compiles with CUDA graphs)
  book          reasoning_from_scratch.ch02.generate_text_basic_cache   where it is installed
  llama.cpp     the figures of a llama-bench run on the same work, read from a file (--llama-bench)

Prefill is the prompt's tokens divided by the time of the first forward pass; decode is the new
tokens after the first divided by the time from the first new token to the last. Each row is timed
over --repeats runs (default 3) after a warm-up, and shows their median, as llama-bench shows a mean
of its runs. The memory roofline is the fastest a decode step can be: bytes of weights read per
token / the read bandwidth measured here. Each row also shows its warm-up's seconds (for a compiled
row, mostly compiling), the memory the process holds after it beyond what it held before (on a
CPU, for a compiled row, the weights' frozen and prepacked copies), and for ours the kernels that
FastGenerator measured fastest. The memory a row needs at its peak: run it alone with --only and read
the peak RSS printed last.

    OMP_NUM_THREADS=2 python bench.py                       # a few minutes on 2 cores
    OMP_NUM_THREADS=2 python bench.py --llama-bench llama.txt --json result.json
    python bench.py --smoke                                 # a tiny shape, seconds: checks the script
    python bench.py --device cuda --compile                 # on a GPU: eager and compiled rows
    OMP_NUM_THREADS=2 python bench.py --batch 1 4 16        # ours on 1, 4 and 16 prompts at once (--compile: compiled)
    OMP_NUM_THREADS=2 python bench.py --compile --only "ours bfloat16 compiled"   # one row: its peak memory

llama.txt is what llama-bench prints (its markdown table, or its -o json output) for
`llama-bench -m qwen3-0.6B-bf16.gguf,qwen3-0.6B-q8_0.gguf -p 128 -n 64 -t 2`.
Compare rows of one run only: shared machines are noisy.

An AVX-512 machine can also time the kernels an AVX2-only CPU gets, for every row of the run
(the capability printed then says it was forced; build llama.cpp without AVX-512 to match):

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench.py
"""
import argparse
import copy
import importlib.util
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

import qwen3_minimal as q

PROMPT_TOKENS, NEW_TOKENS = 128, 64


def cpu_name():
    try:
        return re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def read_bandwidth_gb_s(device, gigabytes=1.0):
    """Read bandwidth of the device's memory, as PyTorch sees it: the best of a few sums over a
    buffer far larger than any cache."""
    data = torch.ones(int(gigabytes * 2**30) // 4, device=device)
    best = float("inf")
    for _ in range(5):
        q._synchronize(device)
        start = time.perf_counter()
        data.sum()
        q._synchronize(device)
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def timed(module, generate):
    """Run generate() with hooks that note when each forward pass of `module` ends; return
    (prefill tokens/s, decode tokens/s, new tokens). Forward pass i gives new token i + 1, so the
    decode figure counts passes 1 .. NEW_TOKENS - 1 (a loop may run one more, for no token)."""
    ends = []
    device = next(module.parameters()).device

    def note_end(*args):
        q._synchronize(device)  # a GPU's work ends later than the call that queued it
        ends.append(time.perf_counter())

    handle = module.register_forward_hook(note_end)
    try:
        start = time.perf_counter()
        tokens = generate()
    finally:
        handle.remove()
    decode = (NEW_TOKENS - 1) / (ends[NEW_TOKENS - 1] - ends[0])
    return PROMPT_TOKENS / (ends[0] - start), decode, tokens.reshape(-1)[-NEW_TOKENS:]


def timed_by_length(generate, device):
    """(prefill tokens/s, decode tokens/s, new tokens) from whole runs of generate(new_tokens), for
    code whose forward passes hooks cannot see (inside a compiled call): a run of one new token is
    the prefill, and the rest of a full run is decoding."""
    seconds = {}
    for new_tokens in (1, NEW_TOKENS):
        q._synchronize(device)
        start = time.perf_counter()
        tokens = generate(new_tokens)
        q._synchronize(device)
        seconds[new_tokens] = time.perf_counter() - start
    prefill, decode = seconds[1], seconds[NEW_TOKENS] - seconds[1]
    return PROMPT_TOKENS / prefill, (NEW_TOKENS - 1) / decode, tokens.reshape(-1)[-NEW_TOKENS:]


def median_run(runs):
    """The (prefill, decode, tokens) of several runs of one row: the median prefill and the median
    decode, each taken apart (llama-bench reports the mean of its runs), and the last run's tokens."""
    return (statistics.median(run[0] for run in runs), statistics.median(run[1] for run in runs), runs[-1][2])


def batch_prompts(batch, vocab_size):
    """`batch` prompts of different lengths, from PROMPT_TOKENS down to half of it (one prompt: PROMPT_TOKENS)."""
    generator = torch.Generator().manual_seed(11)
    lengths = [PROMPT_TOKENS - (PROMPT_TOKENS // 2) * i // max(batch - 1, 1) for i in range(batch)]
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def batch_row(generator, prompts):
    """Ours on several prompts at once: every row's new tokens per second, the time to the first
    token of all rows, and the process's peak memory after the row."""

    def measure():
        timings = {}
        generator.generate(prompts, NEW_TOKENS, timings=timings)
        return timings["decode_tokens"] / timings["decode_s"], timings["prefill_s"]

    return measure


# Each *_row function sets an implementation up and returns a function that times one generation
# as (prefill tokens/s, decode tokens/s, new tokens); add() runs it once to warm up, then times it.

def ours_row(model, ids, compile=False, kernels=None):
    """Ours: one FastGenerator for the row, so that a compiled one compiles (and the kernels are
    measured) in the warm-up run; timed by its own timings (hooks inside a compiled step would break
    its graph). kernels: a dict to fill with what ran, as speed_report shows it."""
    generator = q.FastGenerator(model, compile=compile)

    def measure():
        timings = {}
        tokens = generator.generate(ids, NEW_TOKENS, timings=timings)
        decode = timings["decode_tokens"] / timings["decode_s"]
        if kernels is not None:
            kernels.update(timings["kernels"])
        return timings["prompt_tokens"] / timings["prefill_s"], decode, tokens.reshape(-1)

    return measure


def transformers_row(state, cfg, ids, compile=False):
    """transformers' generate; compiled as transformers does it: a static cache, and the one-token
    forward through torch.compile(mode="reduce-overhead"), CUDA graphs on a GPU."""
    from transformers import CompileConfig, Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=cfg["vocab_size"], hidden_size=cfg["emb_dim"], intermediate_size=cfg["hidden_dim"],
                         num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
                         num_key_value_heads=cfg["n_kv_groups"], head_dim=cfg["head_dim"],
                         max_position_embeddings=cfg["context_length"],
                         tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                         rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_base"]})
    model = Qwen3ForCausalLM._from_config(config, dtype=cfg["dtype"]).to(ids.device).eval()
    book_to_hf = {q.hf_to_book_name(name): name for name in model.state_dict()}
    model.load_state_dict({book_to_hf[name]: tensor for name, tensor in state.items()})

    def generate(new_tokens=NEW_TOKENS, **options):
        with torch.inference_mode():
            return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **options)

    if not compile:
        return lambda: timed(model, generate)
    compile_config = CompileConfig()
    compile_config._compile_all_devices = True  # transformers' flag to compile on CPUs too (for testing, it says)

    def static(new_tokens):
        return generate(new_tokens, cache_implementation="static", compile_config=compile_config)

    return lambda: timed_by_length(static, ids.device)


def book_row(state, cfg, ids, compile=False):
    """The book's model and loop; compiled as chapter 2.9 does it (the first run compiles)."""
    from reasoning_from_scratch import ch02, qwen3

    model = qwen3.Qwen3Model(cfg).to(ids.device).eval()
    model.load_state_dict(state)
    if not compile:
        return lambda: timed(model, lambda: ch02.generate_text_basic_cache(model, ids, NEW_TOKENS))
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    compiled = torch.compile(model)
    # the hooks go on the compiled wrapper, outside the graph
    return lambda: timed(compiled, lambda: ch02.generate_text_basic_cache(compiled, ids, NEW_TOKENS))


def chapter_row(model, ids):
    """The chapter's cached loop on our model: what FastGenerator is there to beat."""
    return lambda: timed(model, lambda: q.generate_text_basic_cache(model, ids, NEW_TOKENS))


def cpu_flags():
    """The CPU's bfloat16 and AMX flags, to name its kind beside the figures (Linux)."""
    try:
        flags = set(re.search(r"flags\s*:(.*)", Path("/proc/cpuinfo").read_text()).group(1).split())
    except (OSError, AttributeError):
        return "not read"
    return " ".join(sorted(flags & {"avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"})) or "none"


def memory_held_gb():
    """What this process holds in memory now (resident set, Linux), in GB; None elsewhere."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, AttributeError):
        return None


def forced_capability():
    """The capability forced by ATEN_CPU_CAPABILITY, if any. torch.compile's on-disk cache does not
    tell forced kernels from native ones (torch 2.13: code compiled for AVX-512 and reused under
    avx2 gave NaN), so a forced run gets a compile cache of its own unless one is set."""
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    if forced and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / f"torchinductor-{forced}")
    return forced


def read_llama_bench(path):
    """llama-bench's figures as rows {name, prefill, decode}: its markdown table or its JSON."""
    text = Path(path).read_text()
    results = {}
    if text.lstrip().startswith("["):
        for entry in json.loads(text):
            kind = "prefill" if entry["n_prompt"] and not entry["n_gen"] else "decode"
            results.setdefault(entry["model_type"], {})[kind] = entry["avg_ts"]
    else:
        for line in text.splitlines():
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if len(cells) >= 3 and re.fullmatch(r"(pp|tg)\d+", cells[-2]):
                kind = "prefill" if cells[-2].startswith("pp") else "decode"
                results.setdefault(cells[0], {})[kind] = float(cells[-1].split("±")[0])
    return [{"name": f"llama.cpp {model}", "prefill": figures.get("prefill"), "decode": figures.get("decode")}
            for model, figures in results.items()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-bench", help="a file with llama-bench's output on the same work")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or all)")
    parser.add_argument("--compile", action="store_true", help="add rows for ours with torch.compile")
    parser.add_argument("--max-autotune", action="store_true", help='add rows for ours with compile="max-autotune"')
    parser.add_argument("--only", action="append", metavar="ROW", help="run only this row (repeatable), e.g. "
                        '"ours bfloat16 compiled": the peak memory printed last is then its own')
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row; the table shows their median")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape, to check the script in seconds")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--batch", type=int, nargs="+", metavar="B",
                        help="instead of the rows above: ours bfloat16 on B prompts of different lengths at once, "
                             "e.g. --batch 1 4 16")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: each row needs at least one timed run, e.g. --repeats 3")
    if args.threads:
        torch.set_num_threads(args.threads)
    forced = forced_capability()

    cfg = dict(q.QWEN_CONFIG_06_B)
    if args.smoke:
        cfg.update(vocab_size=4096, emb_dim=128, n_heads=4, n_kv_groups=2, head_dim=32, hidden_dim=256, n_layers=2,
                   context_length=512)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = q.Qwen3Model(cfg).to(device).eval()  # random weights; the same for every row below
    ids = torch.randint(0, cfg["vocab_size"], (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(7))
    ids = ids.to(device)
    bandwidth = read_bandwidth_gb_s(device, 0.25 if args.smoke else 1.0)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, capability {capability}"
          f"{f' (forced by ATEN_CPU_CAPABILITY={forced})' if forced else ''}, flags: {cpu_flags()}")
    if device.type != "cpu":
        print(f"device: {device_name(device)}")
    print(f"torch {torch.__version__}; read bandwidth {bandwidth:.1f} GB/s")

    if args.batch:
        print(f"\n{'prompts':>8} {'decode tokens/s':>16} {'x one':>6} {'first token s':>14} {'peak RSS GB':>12}"
              + "  (compiled)" * args.compile)
        results, generator = [], q.FastGenerator(model, compile=args.compile)  # one compiled step serves all
        for batch in sorted(args.batch):  # growing batches: the process's peak memory is the last row's
            measure = batch_row(generator, batch_prompts(batch, cfg["vocab_size"]))
            measure()
            runs = [measure() for _ in range(args.repeats)]
            decode, first = statistics.median(run[0] for run in runs), statistics.median(run[1] for run in runs)
            results.append({"batch": batch, "decode": decode, "first_token_s": first,
                            "peak_memory_gb": q.peak_memory(device)[0] / 2**30, "runs": runs})
            print(f"{batch:>8} {decode:>16.2f} {decode / results[0]['decode']:>6.1f} {first:>14.2f} "
                  f"{results[-1]['peak_memory_gb']:>12.2f}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"capability": capability, "compiled": args.compile,
                                                   "batches": results}, indent=1))
        return

    rows = []

    def add(name, weights_model, row, **options):
        """A row: row(**options) sets it up; its measure() runs once to warm up (compiling, measuring
        kernels, building oneDNN's kernels for each shape, loading a GPU's), as llama-bench keeps its
        warm-up run out of its figures; then timed args.repeats times, the median kept, every run's
        figures printed."""
        if args.only and name not in args.only:
            return
        held, start, kernels = memory_held_gb(), time.perf_counter(), {}
        measure = row(**options, **({"kernels": kernels} if row is ours_row else {}))
        measure()
        warm_up_s = time.perf_counter() - start
        runs = [measure() for _ in range(args.repeats)]
        prefill, decode, tokens = median_run(runs)
        per_token = q.weight_bytes_per_token(weights_model)
        added = memory_held_gb() - held if held is not None else None
        rows.append({"name": name, "prefill": prefill, "decode": decode, "tokens": tokens.tolist(),
                     "roofline": bandwidth * 1e9 / per_token, "runs": [run[:2] for run in runs],
                     "warm_up_s": warm_up_s, "memory_added_gb": added, "kernels": kernels})
        ran = ", ".join(f"{what} for {n} row{'s' * (n > 1)}" for n, what in kernels.items())
        print(f"  {name}: prefill {prefill:.1f}, decode {decode:.2f} tokens/s (median of "
              f"{', '.join(f'{run[0]:.1f} / {run[1]:.2f}' for run in runs)}); warm-up {warm_up_s:.1f} s"
              f"{f', memory held +{added:.2f} GB' if added is not None else ''}{f'; kernels: {ran}' if ran else ''}",
              flush=True)

    def add_peer(name, row):
        """A peer's row; a peer that fails (their versions change) costs its row, not the run."""
        try:
            add(name, model, row)
        except Exception as exc:
            print(f"  {name}: failed, left out ({type(exc).__name__}: {str(exc).strip()[:300]})", flush=True)

    int8_too = device.type == "cpu"  # int8 weights are for CPUs: a GPU converts them back for every product
    model32 = copy.deepcopy(model).float()
    model32.cfg = {**cfg, "dtype": torch.float32}
    int8 = q.quantize_int8(copy.deepcopy(model)) if int8_too else None
    add("ours bfloat16", model, ours_row, model=model, ids=ids)
    add("ours bfloat16, the chapter's loop", model, chapter_row, model=model, ids=ids)
    add("ours float32", model32, ours_row, model=model32, ids=ids)
    del model32
    if int8_too:
        add("ours int8", int8, ours_row, model=int8, ids=ids)
    # generating leaves a model as it was: the compiled rows run the same models
    for suffix, compile in [(" compiled", args.compile), (" max-autotune", args.max_autotune and "max-autotune")]:
        if compile:
            add("ours bfloat16" + suffix, model, ours_row, model=model, ids=ids, compile=compile)
            if int8_too:
                add("ours int8" + suffix, int8, ours_row, model=int8, ids=ids, compile=compile)
    del int8
    state = model.state_dict()
    transformers, book = importlib.util.find_spec("transformers"), importlib.util.find_spec("reasoning_from_scratch")
    if transformers:
        add_peer("transformers bfloat16", lambda: transformers_row(state, cfg, ids))
    if book:
        add_peer("book package bfloat16", lambda: book_row(state, cfg, ids))
        if args.compile:
            add_peer("book package compiled", lambda: book_row(state, cfg, ids, compile=True))
    if transformers and args.compile:  # last: the longest to compile
        add_peer("transformers compiled", lambda: transformers_row(state, cfg, ids, compile=True))
    llama = read_llama_bench(args.llama_bench) if args.llama_bench else []

    reference = next((row for row in llama if "BF16" in row["name"].upper()), None)
    q8 = next((row for row in llama if "Q8_0" in row["name"].upper()), None)
    if not rows:
        parser.error(f"--only {args.only}: no such row; the rows are named as this script prints them")
    print(f"\n{'':34} {'prefill':>8} {'decode':>7} {'roof%':>6} {'pf/llama':>9} {'dec/llama':>10} {'same tokens':>12}")
    for row in rows + llama:
        ratios = ["", ""]
        against = q8 if "int8" in row["name"] else reference  # int8 is compared with llama.cpp's Q8_0
        if against and row in rows:
            ratios = [f"{row['prefill'] / against['prefill']:.2f}", f"{row['decode'] / against['decode']:.2f}"]
        same = (f"{sum(a == b for a, b in zip(row['tokens'], rows[0]['tokens']))}/{NEW_TOKENS}"
                if "tokens" in row else "")
        roof = f"{100 * row['decode'] / row['roofline']:.0f}" if "roofline" in row else ""
        prefill = f"{row['prefill']:.1f}" if row.get("prefill") else "-"
        decode = f"{row['decode']:.2f}" if row.get("decode") else "-"
        print(f"{row['name']:34} {prefill:>8} {decode:>7} {roof:>6} {ratios[0]:>9} {ratios[1]:>10} {same:>12}")
    print(f"(pf and dec /llama: ratios to llama.cpp BF16, for int8 to Q8_0; same tokens: as {rows[0]['name']}'s; "
          f"its roofline: {rows[0]['roofline']:.1f} tokens/s)")
    by_name = {row["name"]: row for row in rows}
    pairs = [("ours bfloat16 compiled", reference), ("ours int8 compiled", q8)] + [
        ("ours bfloat16", by_name.get(name)) for name in
        ("ours bfloat16, the chapter's loop", "transformers bfloat16", "book package bfloat16")]
    ratios = [f"{name} / {other['name']}: {by_name[name]['decode'] / other['decode']:.2f}"
              for name, other in pairs if name in by_name and other and other.get("decode")]
    if ratios:
        print(f"decode, ratio of medians (capability {capability}):\n  " + "\n  ".join(ratios))
    peak, what = q.peak_memory(device)
    if peak is not None:
        print(f"peak memory of this run: {peak / 2**30:.2f} GB ({what})")
    if args.json:
        info = {"cpu": cpu_name(), "device": device_name(device), "capability": capability,
                "capability_forced": forced, "cpu_flags": cpu_flags(),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "bandwidth_gb_s": bandwidth,
                "repeats": args.repeats, "date": time.strftime("%Y-%m-%d")}
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows + llama}, indent=1))


if __name__ == "__main__":
    main()
