"""Power and SM clock while each variant runs: is a slower GEMM in a compiled graph the card's power cap?

    PYTHONPATH=. python benchmarks/gpu_clocks.py          # writes $OUT (or /tmp)/clocks.json and smi.csv

Samples `nvidia-smi` every 50 ms in the background while it runs (1) a bf16 GEMM microbenchmark
(8192x4096 @ 4096x14336, F.linear vs mm(out=), alone, interleaved with memory-bound kernels, and after
idle gaps; the order of these cases heats the card, so compare them with care), then (2) 15 timed
8k prefills each of hf_eager, sliminfer and sliminfer_paper (Llama-3.1-8B shape, as gpu_prefill.py),
and reports the median SM clock, power and throttle reasons per phase. Needs a CUDA GPU.
"""
import json, os, subprocess, sys, time
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_prefill as gp

out = os.environ.get("OUT", "/tmp")
smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active",
                        "--format=csv,noheader", "-lms", "50"], stdout=open(f"{out}/smi.csv", "w"))
marks = []
def mark(name):
    torch.cuda.synchronize(); marks.append((name, time.time()))

def gemm_bench():
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    buf = torch.empty(8192, 14336, device="cuda", dtype=torch.bfloat16)
    big = torch.randn(8192, 14336, device="cuda", dtype=torch.bfloat16)
    res = {}
    for name in ("linear", "mm_out", "linear_interleaved", "mm_out_interleaved", "linear_idle_gaps"):
        evs = []
        for i in range(60):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if name.endswith("interleaved"):
                big.mul_(1.0001); big.add_(0.5)
            if name == "linear_idle_gaps":
                torch.cuda._sleep(2_000_000)
            s.record()
            if name.startswith("linear"):
                y = torch.nn.functional.linear(x, w)
            else:
                torch.mm(x, w.t(), out=buf)
            e.record(); evs.append((s, e))
        torch.cuda.synchronize()
        t = sorted(s.elapsed_time(e) for s, e in evs[10:])
        res[name] = {"median_ms": t[len(t)//2], "tflops": 2*8192*4096*14336/ (t[len(t)//2]*1e-3) / 1e12}
        mark("gemm_" + name)
    return res

mark("start")
r = {"gemm": gemm_bench()}
args = gp.parse_args(["--lengths", "8192"])
model = gp.build_model(args, torch.device("cuda"))
inputs = gp.make_inputs(8192, model.config.vocab_size, args, torch.device("cuda"))
for variant in ("hf_eager", "sliminfer", "sliminfer_paper"):
    m = gp.prepare(model, variant)
    gp.prefill(m, inputs); gp.prefill(m, inputs)
    time.sleep(3)
    mark(variant + "_begin")
    times = [gp.timed_call(m, inputs, torch.device("cuda"))[0] for _ in range(15)]
    mark(variant + "_end")
    r[variant] = sorted(times)[7]
    if variant != "hf_eager":
        import slimpass; slimpass.restore(model); torch._dynamo.reset()
time.sleep(0.5)
smi.terminate(); smi.wait()
r["marks"] = marks
# summarize clocks per phase
import datetime
rows = []
for line in open(f"{out}/smi.csv"):
    parts = [p.strip() for p in line.split(",")]
    try:
        ts = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
    except Exception:
        continue
    rows.append((ts, parts[1], parts[2], parts[3], parts[4]))
phases = {}
for (n1, t1), (n2, t2) in zip(marks, marks[1:]):
    sel = [row for row in rows if t1 <= row[0] <= t2]
    phases[n2] = {"n": len(sel), "sm_clock": sorted(s[1] for s in sel)[len(sel)//2] if sel else None,
                  "power": sorted(s[2] for s in sel)[len(sel)//2] if sel else None,
                  "throttle": sorted({s[4] for s in sel})}
r["phases"] = phases
print(json.dumps(r, indent=1))
json.dump(r, open(f"{out}/clocks.json", "w"), indent=1)
