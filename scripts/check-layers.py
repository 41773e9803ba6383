#!/usr/bin/env python3
"""check-layers.py: host/ is layered, and this says whether it still is.

    core < ops (with kernels/), dist < io < model < store, sae < attrib, analysis < cli

(kernels/ctx.cu and kernels/capture.cu, the CUDA half of the execution context, are core:
see KERNEL_LAYER.)

A file may include headers of its own layer or below, and call functions defined in its own
layer or below; and no files call each other in a cycle, within a layer or across. Calls are
read from the compiled objects (nm: what each object defines and what it needs), so macros
and static inline helpers do not hide an edge, and includes from the sources. Usage:
    scripts/check-layers.py [BUILD]      (default build; run after `make`)
Prints every violation and exits 1 if there is one."""
import collections, glob, os, re, subprocess, sys

RANK = {"core": 0, "ops": 1, "kernels": 1, "dist": 1, "io": 2, "model": 3, "store": 4, "sae": 4,
        "attrib": 5, "analysis": 5, "cli": 6}

# kernels/ holds the CUDA twins of the ops, at the ops' level, and also the CUDA half of the
# execution context, which is core: lp_ctx_* (host/core/tensor.c) allocates and copies
# through it (declared in host/core/device.h). Those files, and their stand-in in a build
# without CUDA, are ranked with core, so they are held to core's rules too.
KERNEL_LAYER = {"kernels/ctx": "core", "kernels/capture": "core", "kernels/ctx_stub": "core"}


# No cycle is allowed anywhere; this stays empty.
KNOWN_CYCLE = set()


def layer(path):
    p = path.split("/")
    if p[0] == "kernels":
        return KERNEL_LAYER.get(re.sub(r"\.(cu|c|cuh)$", "", path), "kernels")
    return p[1]


def objects(build):
    objs = glob.glob(f"{build}/host/**/*.o", recursive=True) + glob.glob(f"{build}/kernels/*.o")
    # only objects whose source still exists (a build directory keeps stale ones)
    live = lambda o: any(os.path.exists(o[len(build) + 1:-2] + x) for x in (".c", ".cu"))
    return [o for o in objs if live(o)]


def symbols(obj):
    out = subprocess.run(["nm", obj], capture_output=True, text=True, check=True).stdout
    defined, needed = set(), set()
    for line in out.splitlines():
        f = line.split()
        if len(f) == 3 and f[1] in "TDBRV":
            defined.add(f[2])
        elif len(f) == 2 and f[0] == "U":
            needed.add(f[1])
    return defined, needed


def call_graph(build):
    src = lambda o: o[len(build) + 1:-2]  # build/host/x/y.o -> host/x/y
    defs, needs = {}, {}
    for o in objects(build):
        d, n = symbols(o)
        for s in d:
            defs[s] = src(o)
        needs[src(o)] = n
    g = collections.defaultdict(set)
    for f, n in needs.items():
        for s in n:
            if s in defs and defs[s] != f:
                g[f].add((defs[s], s))
    return needs.keys(), g


def sccs(nodes, edges):
    """Tarjan's strongly connected components."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "build"
    if not objects(build):
        sys.exit(f"check-layers: no objects under {build}/host: run make first")
    bad = []
    # includes
    for f in glob.glob("host/**/*.[ch]", recursive=True) + glob.glob("kernels/*.cu*") + glob.glob("kernels/*.c"):
        for n, line in enumerate(open(f, errors="replace"), 1):
            m = re.match(r'\s*#\s*include\s+"([a-z_]+)/', line)
            if m and m.group(1) in RANK and RANK[m.group(1)] > RANK[layer(f)]:
                bad.append(f"{f}:{n}: includes {line.split()[-1]}, a layer above {layer(f)}/")
    # calls
    nodes, g = call_graph(build)
    for f, outs in sorted(g.items()):
        for to, sym in sorted(outs):
            if RANK[layer(to)] > RANK[layer(f)]:
                bad.append(f"{f}.c calls {sym} of {to}, a layer above {layer(f)}/")
    files = {f: {t for t, _ in outs} for f, outs in g.items()}
    known = []
    for comp in sccs(sorted(nodes), files):
        if len(comp) > 1:
            (known if set(comp) <= set(KNOWN_CYCLE) else bad).append("call cycle: " + " <-> ".join(sorted(comp)))
    for k in known:
        print("allowed for now: " + k)
    for b in bad:
        print(b)
    n_edges = sum(len(v) for v in files.values())
    print(f"check-layers: {len(list(nodes))} files, {n_edges} file-to-file call edges, {len(bad)} violations"
          f"{f', {len(known)} allowed for now (host/model/)' if known else ''}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
