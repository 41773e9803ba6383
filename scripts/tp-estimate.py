#!/usr/bin/env python3
"""Tensor-parallel scaling estimate for one forward, layer by layer (README, "Running on a cluster").

Megatron-style TP splits every GEMM of a layer evenly over the n ranks and adds two
all-reduces of the residual stream per layer forward (after attention-out and MLP-out):
each of B*T*d values in the activation dtype. With NCCL's ring all-reduce each rank sends
and receives 2(n-1)/n of the buffer, and NCCL reports "bus bandwidth" so that

    time = bytes * 2(n-1)/n / busbw

Compute: every GEMM of the attention block (q/k/v and output projections), its core (QK^T
and PV) and the MLP block at a stated fraction of the GPU's dense peak (--mfu; or --layer-ms,
a measured time of one whole layer on one GPU) times its wave fill (wave_fill: the share of
the SMs' tile slots its output keeps busy), at the shapes it has: one GPU's whole batch for
the reference, a rank's n-times-narrower slice of a micro-batch's rows under TP. Efficiency
is one GPU's time over n times a rank's, so what narrower and shorter GEMMs lose to wave
quantization counts against the split.

Two schedules:

* plain (no overlap): each all-reduce is waited for at once, so a layer takes its compute
  plus both all-reduces (plus --sync-us after each, the host seeing it end and launching
  the next kernels); its time is a rank's compute (at its wave fill) + communication
  (+ sync), and its efficiency one GPU's time over n times that.

* interleaved (what loupe runs when nothing hooks the forward, decoder.c): the batch in k
  micro-batches (--parts; loupe's default, auto_parts, is added and marked *), every block
  (attention, MLP) run part after part on the compute stream; a part's all-reduce starts
  on a second stream when its block ends and is waited for only when that part's next
  block begins. So part j's all-reduce (1/k of the
  buffer) travels while parts j+1.. compute the same block and part 0.. the next one. This
  script plays that schedule out event by event over all layers: two queues (the compute
  stream in block-then-part order; the communication stream, NCCL running one collective
  at a time, in the order they were started), part j's block s starting only after part j's
  all-reduce of block s-1 has ended plus --sync-us (the host sees the end by polling, then
  queues the kernels). What compute does not cover is exposed: per block, what of one part's
  all-reduce the following parts' compute does not cover, and the pipeline's fill (the
  first block) and drain (the last part's last all-reduce). While an all-reduce runs,
  compute is slowed by --slowdown: NCCL's kernels take SMs from the GEMMs (a ring
  all-reduce over NVLink runs on 16-32 CTAs, i.e. 12-24% of an H100's 132 SMs, which a GEMM
  of several waves loses while both run; a GEMM of exactly one wave can lose far more, to a
  second, nearly empty wave: NVIDIA developer forum, "Compute-communication overlap causes
  severe GEMM performance degradation because of tail effect", H100 with a 24-CTA NCCL
  all-gather beside a 132-block GEMM). NCCL's CTA policy (NCCL_CTA_POLICY_EFFICIENCY) and
  max CTAs trade all-reduce speed for those SMs; loupe sets neither. Default 10%, with 20%
  as the pessimistic case.

    python3 scripts/tp-estimate.py                 # Llama-3-8B shape, 8 x 1024 tokens, TP=8, H100
    python3 scripts/tp-estimate.py --mfu 0.4 --tp 4 --parts 2 4 --batch 16
"""
import argparse


def block_flops(a):
    """Forward FLOPs of one layer's attention block and MLP block for the whole batch
    (causal attention counted on half)."""
    n = a.batch * a.seq
    q, kv = a.heads * a.d_head, a.kv_heads * a.d_head
    proj = 2 * n * a.d_model * (q + 2 * kv) + 2 * n * q * a.d_model  # q, k, v in; attention out
    attn = 2 * 2 * a.batch * a.heads * a.d_head * a.seq * (a.seq + 1) / 2  # QK^T and PV
    mlp = (3 if a.gated else 2) * 2 * n * a.d_model * a.d_mlp  # gate, up, down (or in, out)
    return proj + attn, mlp


TILES = ((128, 128), (128, 256), (256, 128), (64, 128), (128, 64))


def wave_fill(m, n, sms):
    """The fraction of the SMs' tile slots a GEMM of an m x n output keeps busy with useful
    work: whole tiles in whole waves (a last partial wave and partial edge tiles are idle
    slots), for the best of the usual tile shapes. No split-K or stream-K, which cuBLAS may
    use on an under-filled shape: this is the pessimistic side."""
    best = 0.0
    for tm, tn in TILES:
        tiles = -(-m // tm) * -(-n // tn)
        waves = -(-tiles // sms)
        best = max(best, m * n / (waves * sms * tm * tn))
    return best


def block_seconds(a, n, rows, tflops):
    """Seconds of one rank's attention block and MLP block over `rows` tokens (rows / seq
    whole sequences) at TP = n: every GEMM and the attention core at `tflops` (the GEMM
    fraction of the peak) times its wave fill at this rank's shape, so narrower slices and
    smaller micro-batches lose what quantization takes from them. Key/value heads replicate
    when there are fewer than ranks (one per rank)."""
    hq, hkv = a.heads // n, max(a.kv_heads // n, 1)
    d, dh, f = a.d_model, a.d_head, a.d_mlp // n
    seqs = rows // a.seq

    def gemm(m, cols, k):
        return 2 * m * cols * k / (tflops * wave_fill(m, cols, a.sms))

    # flash attention: one CTA per (sequence, head, 128 queries), causal half of the work
    ctas = seqs * hq * -(-a.seq // 128)
    core = 4 * seqs * hq * dh * a.seq * (a.seq + 1) / 2 / (tflops * ctas / (-(-ctas // a.sms) * a.sms))
    attn = gemm(rows, (hq + 2 * hkv) * dh, d) + core + gemm(rows, d, hq * dh)
    mlp = (2 if a.gated else 1) * gemm(rows, f, d) + gemm(rows, d, f)
    return attn, mlp


def interleaved(blocks, comms, layers, slowdown, sync):
    """Seconds of `layers` layers in len(blocks) micro-batches. blocks[j]: (attention, MLP)
    compute seconds of part j on one rank; comms[j]: seconds of part j's all-reduce. One
    part is the plain schedule (each all-reduce waited for at once)."""
    parts = len(blocks)
    order = [(s, j) for s in range(2 * layers) for j in range(parts)]
    work = {o: blocks[o[1]][o[0] % 2] for o in order}  # compute seconds at full speed
    c_done, r_done = {}, {}
    t, ci, ri = 0.0, 0, 0
    c_run = r_run = None  # [task, remaining]
    eps = 1e-15
    while ri < len(order):
        if c_run is None and ci < len(order):
            s, j = order[ci]
            dep = r_done.get((s - 1, j)) if s > 0 else -sync
            if dep is not None and t >= dep + sync - eps:
                c_run, ci = [order[ci], work[order[ci]]], ci + 1
        if r_run is None and order[ri] in c_done:
            r_run, ri = [order[ri], comms[order[ri][1]]], ri + 1
        rate = 1.0 / (1.0 + slowdown) if r_run else 1.0
        steps = []
        if c_run:
            steps.append(c_run[1] / rate)
        if r_run:
            steps.append(r_run[1])
        if c_run is None and ci < len(order):  # waiting on an all-reduce, plus the host's poll
            s, j = order[ci]
            dep = r_done.get((s - 1, j)) if s > 0 else None
            if dep is not None and dep + sync > t:
                steps.append(dep + sync - t)
        if not steps:
            if r_run is None and ri < len(order) and order[ri] not in c_done and c_run is None and ci >= len(order):
                raise RuntimeError("schedule stuck")
            continue
        dt = min(steps)
        t += dt
        if c_run:
            c_run[1] -= dt * rate
            if c_run[1] <= eps:
                c_done[c_run[0]] = t
                c_run = None
        if r_run:
            r_run[1] -= dt
            if r_run[1] <= eps:
                r_done[r_run[0]] = t
                r_run = None
    return t


def auto_parts(batch):
    """The micro-batches loupe takes by default (dist.tp_parts = 0, lp_model_tp_parts in
    decoder.c), as sequences per part: B/4, B/2, B/4 when 4 divides the batch, else halves,
    else one (the plain schedule)."""
    if batch % 4 == 0:
        return (batch // 4, batch // 2, batch // 4)
    return (batch // 2,) * 2 if batch % 2 == 0 else (batch,)


def split_of(spec, batch):
    """--parts: K (equal parts) or ratios a:b:c, as sequences per part (None: not whole
    sequences, or more parts than loupe runs: LP_DIST_MAX_STARTED, 8)."""
    w = [int(x) for x in spec.split(":")] if ":" in spec else [1] * int(spec)
    if not w or len(w) > 8 or min(w) < 1 or batch % sum(w):
        return None
    return tuple(batch // sum(w) * x for x in w)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--d-head", type=int, default=128)
    p.add_argument("--d-mlp", type=int, default=14336)
    p.add_argument("--gated", type=int, default=1, help="1: SwiGLU (3 MLP matrices), 0: GELU (2)")
    p.add_argument("--bytes", type=int, default=2, help="bytes per activation value (bf16: 2)")
    p.add_argument("--peak-tflops", type=float, default=990.0, help="dense bf16 peak of one GPU (H100 SXM: 989.5)")
    p.add_argument("--sms", type=int, default=132, help="SMs of one GPU (H100 SXM: 132)")
    p.add_argument("--mfu", type=float, nargs="+", default=[0.4, 0.6, 0.75],
                   help="fractions of the peak a GEMM of whole waves reaches")
    p.add_argument("--layer-ms", type=float, default=None, help="measured ms of one layer on one GPU (replaces --mfu)")
    p.add_argument("--busbw", type=float, nargs="+", default=[370.0, 480.0], help="NCCL all-reduce bus bandwidth, GB/s")
    p.add_argument("--latency-us", type=float, default=0.0, help="fixed cost of one all-reduce, microseconds")
    p.add_argument("--parts", nargs="+", default=["2", "4"],
                   help="micro-batches of the interleaved schedule: K equal parts, or ratios such as 1:2:1 "
                        "(loupe's default is added)")
    p.add_argument("--slowdown", type=float, nargs="+", default=[0.10, 0.20],
                   help="compute slowdown while an all-reduce runs (NCCL's kernels on the SMs)")
    p.add_argument("--sync-us", type=float, default=20.0,
                   help="from an all-reduce's end to the next kernels that need it (the host polls, then launches)")
    p.add_argument("--target", type=float, default=0.80)
    a = p.parse_args()

    n, rows = a.tp, a.batch * a.seq
    fa, fm = block_flops(a)
    fl = fa + fm
    buf = rows * a.d_model * a.bytes
    moved = buf * 2 * (n - 1) / n
    auto = auto_parts(a.batch)
    splits = [x for x in (split_of(spec, a.batch) for spec in a.parts) if x and len(x) > 1]
    splits = sorted(set(splits) | ({auto} if len(auto) > 1 else set()), key=lambda x: (len(x), x))
    print(f"shape: {a.layers} layers, d_model {a.d_model}, {a.heads} heads ({a.kv_heads} kv) x {a.d_head}, d_mlp {a.d_mlp}; "
          f"batch {a.batch} x {a.seq} = {rows} tokens; TP={n}")
    print(f"per layer forward: {fl / 1e12:.3f} TFLOP in all ({fa / fl:.0%} attention block, {fm / fl:.0%} MLP), "
          f"{fl / n / 1e12:.4f} TFLOP per rank; 2 all-reduces of {buf / 2**20:.0f} MiB, each moving {moved / 2**20:.0f} MiB "
          f"per rank (ring: 2(n-1)/n)")
    print(f"efficiency: one GPU's time for the layer / ({n} x a rank's), every GEMM at its wave fill ({a.sms} SMs) on "
          f"both sides")
    label = lambda x: "+".join(map(str, x))
    print(f"interleaved: micro-batches of {' or '.join(label(x) for x in splits)} sequences (loupe's default here: "
          f"{label(auto) if len(auto) > 1 else 'the plain schedule'}, marked *); compute "
          f"{'/'.join(f'{s:.0%}' for s in a.slowdown)} slower while an all-reduce runs; both schedules: {a.sync_us:.0f} us "
          f"from an all-reduce's end to the kernels that need it")
    unit = sum(block_seconds(a, 1, rows, 1.0))  # one GPU's layer at 1 FLOP/s
    rates = [(f"measured {a.layer_ms} ms/layer", unit / (a.layer_ms / 1e3))] if a.layer_ms else \
        [(f"{m:.0%} of {a.peak_tflops:.0f} TFLOP/s", a.peak_tflops * 1e12 * m) for m in a.mfu]
    variants = [(x, s) for x in splits for s in a.slowdown]
    names = [f"{label(x)}, +{s:.0%}{'*' if x == auto else ''}" for x, s in variants]
    head = "".join(f" {v:>14}" for v in names)
    sub = "".join(f" {'efficiency':>14}" for _ in variants)
    print(f"{'compute':>24} {'busbw':>5} {'compute':>8} {'comm':>6} {'no overlap':>10}{head}  {'target':>6}")
    print(f"{'':>24} {'GB/s':>5} {'ms/layer':>8} {'ms':>6} {'efficiency':>10}{sub}")
    sync = a.sync_us * 1e-6
    for what, rate in rates:
        one = a.layers * unit / rate  # the whole forward on one GPU
        whole = block_seconds(a, n, rows, rate)
        tc = sum(whole)
        for bw in a.busbw:
            # one all-reduce of b of the batch's sequences
            comm = lambda b: moved * b / a.batch / (bw * 1e9) + a.latency_us * 1e-6
            tr = comm(a.batch)
            # the event simulation with one part is the plain schedule: compute + 2 all-reduces
            # per layer, plus the host's poll and launch after each (as in the interleaved one)
            assert abs(interleaved([whole], [tr], 2, 0.0, 0.0) - 2 * (tc + 2 * tr)) < 1e-9
            plain = one / n / interleaved([whole], [tr], a.layers, 0.0, sync)
            effs = [one / n / interleaved([block_seconds(a, n, b * a.seq, rate) for b in x], [comm(b) for b in x], a.layers, s,
                                          sync) for x, s in variants]
            mine = [e for (x, _), e in zip(variants, effs) if x == auto] or [plain]
            cols = "".join(f" {e:>14.1%}" for e in effs)
            print(f"{what:>24} {bw:>5.0f} {tc * 1e3:>8.3f} {2 * tr * 1e3:>6.3f} {plain:>10.1%}{cols}  "
                  f"{'met' if min(mine) >= a.target else 'missed':>6}")
    print(f"target {a.target:.0%}: met or missed by the default schedule (*) at every slowdown")


if __name__ == "__main__":
    main()
