#!/usr/bin/env python3
"""Generate loupe's attribution reference fixtures: hook gradients, attribution patching (AtP) and
exact activation patching, in float64, for the committed tiny GPT-2 and Llama checkpoints.

Usage: python3 tests/gen/gen_attrib_fixture.py OUTDIR        (normally OUTDIR = tests/fixtures/attrib)
       reads tests/fixtures/gpt2-tiny and tests/fixtures/llama-tiny (next to this script's tests/)

Writes, for NAME in gpt2-tiny, llama-tiny:
  OUTDIR/NAME.safetensors   (tokens and ids I32; big tensors F32; metrics, patching and AtP F64)
      tokens.clean, tokens.corrupted   I32 [2,12]   the two batches (differ at positions 3 and 8)
      answer, wrong                    I32 [2]      per-row answer / wrong-answer token
      metric.clean, metric.corrupted   F64 [1]      mean over rows of logit[answer] - logit[wrong] at the last position
      metric_rows.clean, ...corrupted  F64 [2]      the same per row
      logits_last.clean, ...corrupted  F32 [2,V]    logits at the last position
      grad.<hook>                      F32 (hook's shape)  d metric(corrupted run) / d hook, for every hook
                                       (hook_attn_scores: zero where masked)
      clean.<hook>, corrupted.<hook>   F32 (hook's shape)  activations of both runs for the grid hooks
      patch.<kind>                     F64 [L,T], [L,T,heads] or [L,H]  metric of the corrupted run with that node
                                       replaced by its clean value (all rows at once)
      atp.<kind>                       F64, same shapes: sum over the node's features (and rows) of
                                       (clean - corrupted) * grad
  OUTDIR/NAME.json          tokens, answers, metric definition, the key list with shapes and dtypes, and
                            the self-check figures

How it is computed: the forward pass is re-implemented here from the Hugging Face module weights with
every TransformerLens hook an explicit tensor of the autograd graph (hk() below), in float64. It is
checked against (1) HF's own float64 logits to 1e-10 (llama-tiny inside gen_llama_fixture.exact_float64,
which removes transformers' float32 islands), (2) every hook value recorded on the HF modules by
gen_gpt2_fixture.reference_run / gen_llama_fixture.reference_hooks to 1e-10, on both batches, and (3) the
committed reference.safetensors of each model (float32-stored) on its own tokens. Gradients come from
torch.autograd.grad; each is checked against central finite differences along a seeded random
direction, and every grid node's AtP score against the central difference of the patching metric
along (clean - corrupted). Exact patching of every node with the corrupted run's own value must give
the corrupted metric bit for bit; patching blocks.0.hook_resid_pre everywhere must give the clean
metric bit for bit; at ln_final.hook_normalized, where the metric is linear, AtP must equal exact
patching.
"""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import json
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gen_gpt2_fixture as g2  # noqa: E402
import gen_llama_fixture as gl  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(HERE), "fixtures")
B, T = 2, 12
CORRUPT_POS = (3, 8)  # the corrupted batch replaces the tokens at these positions (both rows)
SEEDS = {"gpt2-tiny": 4100, "llama-tiny": 4200}
SEED_DIRS = 77
FD_EPS = 1e-4  # central differences with one Richardson step: error O(eps^4) + rounding ~1e-16/eps
GRID_RESID = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
GRID_HEAD = ("attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v")
GRID_KINDS = GRID_RESID + GRID_HEAD + ("attn.hook_pattern",)


def check_close(name, a, b, atol=1e-10, rtol=1e-10):
    gl.check_close(name, a, b, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# the forward pass with explicit hook tensors

class TLForward:
    """A TransformerLens-style forward over HF weights (float64). forward() returns (logits, acts):
    acts maps every hook name to the tensor that flows on from that hook point. edits maps hook names
    to functions applied to the value before it flows on (activation patching)."""

    def __init__(self, hf, arch):
        self.arch = arch
        cfg = hf.config
        self.cfg = cfg
        sd = {k: v.detach().to(torch.float64).clone() for k, v in hf.state_dict().items()}
        if arch == "gpt2":
            self.D, self.H, self.L = cfg.n_embd, cfg.n_head, cfg.n_layer
            self.KV = self.H
            self.eps = cfg.layer_norm_epsilon
            pre = "transformer."
        else:
            self.D, self.H, self.L = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
            self.KV = cfg.num_key_value_heads
            self.eps = cfg.rms_norm_eps
            pre = "model."
            self.inv_freq, _ = gl.inv_freq_f64(cfg)
        self.DH = self.D // self.H
        self.V = cfg.vocab_size
        self.w = {k[len(pre):] if k.startswith(pre) else k: v for k, v in sd.items()}
        if "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["wte.weight" if arch == "gpt2" else "embed_tokens.weight"]

    def requires_grad(self, on):
        for v in self.w.values():
            v.requires_grad_(on)

    def hook_names(self):
        names = ["hook_embed"] + (["hook_pos_embed"] if self.arch == "gpt2" else [])
        for L in range(self.L):
            p = f"blocks.{L}."
            names += [p + "hook_resid_pre", p + "ln1.hook_scale", p + "ln1.hook_normalized",
                      p + "attn.hook_q", p + "attn.hook_k", p + "attn.hook_v"]
            if self.arch == "llama":
                names += [p + "attn.hook_rot_q", p + "attn.hook_rot_k"]
            names += [p + "attn.hook_attn_scores", p + "attn.hook_pattern", p + "attn.hook_z",
                      p + "hook_attn_out", p + "hook_resid_mid", p + "ln2.hook_scale", p + "ln2.hook_normalized",
                      p + "mlp.hook_pre"]
            if self.arch == "llama":
                names += [p + "mlp.hook_pre_linear"]
            names += [p + "mlp.hook_post", p + "hook_mlp_out", p + "hook_resid_post"]
        return names + ["ln_final.hook_scale", "ln_final.hook_normalized"]

    def _norm(self, hk, name, x, w, b):
        if self.arch == "gpt2":  # TransformerLens LayerNorm: centre, scale, normalize, affine
            x = x - x.mean(-1, keepdim=True)
        scale = hk(name + ".hook_scale", (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        normed = hk(name + ".hook_normalized", x / scale)
        return normed * w + b if b is not None else normed * w

    def _rotary(self, x, nt):
        """Llama rotary (rotate-half convention) from the float64 inverse frequencies. x: [B,T,heads,DH]"""
        freqs = torch.arange(nt, dtype=torch.float64)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
        h = self.DH // 2
        rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
        return x * cos + rot * sin

    def forward(self, tokens, edits=None):
        w = self.w
        acts = {}
        nb, nt = tokens.shape
        D, H, KV, DH = self.D, self.H, self.KV, self.DH
        G = H // KV
        tok = tokens.long()

        def hk(name, x):
            f = edits.get(name) if edits else None
            if f is not None:
                x = f(x)
            x = x.clone()  # its own node of the graph, so the gradient is the hook's alone
            acts[name] = x
            return x

        causal = torch.tril(torch.ones(nt, nt, dtype=torch.bool))
        if self.arch == "gpt2":
            embed = hk("hook_embed", w["wte.weight"][tok])
            pos = hk("hook_pos_embed", w["wpe.weight"][torch.arange(nt)[None, :].expand(nb, nt)])
            resid = embed + pos
        else:
            resid = hk("hook_embed", w["embed_tokens.weight"][tok])
        for L in range(self.L):
            p = f"blocks.{L}."
            resid = hk(p + "hook_resid_pre", resid)
            if self.arch == "gpt2":
                hp = f"h.{L}."
                x = self._norm(hk, p + "ln1", resid, w[hp + "ln_1.weight"], w[hp + "ln_1.bias"])
                qkv = x @ w[hp + "attn.c_attn.weight"] + w[hp + "attn.c_attn.bias"]
                q, k, v = qkv.split(D, dim=2)
                q = hk(p + "attn.hook_q", q.reshape(nb, nt, H, DH))
                k = hk(p + "attn.hook_k", k.reshape(nb, nt, KV, DH))
                v = hk(p + "attn.hook_v", v.reshape(nb, nt, KV, DH))
                qr, kr = q, k
            else:
                hp = f"layers.{L}."
                x = self._norm(hk, p + "ln1", resid, w[hp + "input_layernorm.weight"], None)
                q = hk(p + "attn.hook_q", (x @ w[hp + "self_attn.q_proj.weight"].T).reshape(nb, nt, H, DH))
                k = hk(p + "attn.hook_k", (x @ w[hp + "self_attn.k_proj.weight"].T).reshape(nb, nt, KV, DH))
                v = hk(p + "attn.hook_v", (x @ w[hp + "self_attn.v_proj.weight"].T).reshape(nb, nt, KV, DH))
                qr = hk(p + "attn.hook_rot_q", self._rotary(q, nt))
                kr = hk(p + "attn.hook_rot_k", self._rotary(k, nt))
            kr_h = kr.repeat_interleave(G, dim=2)  # query head h reads kv head h // G
            v_h = v.repeat_interleave(G, dim=2)
            scores = torch.einsum("bqhd,bkhd->bhqk", qr, kr_h) / math.sqrt(DH)
            scores = hk(p + "attn.hook_attn_scores", scores.masked_fill(~causal, float("-inf")))
            pattern = hk(p + "attn.hook_pattern", torch.softmax(scores, dim=-1))
            z = hk(p + "attn.hook_z", torch.einsum("bhqk,bkhd->bqhd", pattern, v_h))
            if self.arch == "gpt2":
                attn_out = z.reshape(nb, nt, D) @ w[hp + "attn.c_proj.weight"] + w[hp + "attn.c_proj.bias"]
            else:
                attn_out = z.reshape(nb, nt, D) @ w[hp + "self_attn.o_proj.weight"].T
            attn_out = hk(p + "hook_attn_out", attn_out)
            resid = hk(p + "hook_resid_mid", resid + attn_out)
            if self.arch == "gpt2":
                x = self._norm(hk, p + "ln2", resid, w[hp + "ln_2.weight"], w[hp + "ln_2.bias"])
                pre = hk(p + "mlp.hook_pre", x @ w[hp + "mlp.c_fc.weight"] + w[hp + "mlp.c_fc.bias"])
                gelu = 0.5 * pre * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (pre + 0.044715 * pre.pow(3))))
                post = hk(p + "mlp.hook_post", gelu)
                mlp_out = post @ w[hp + "mlp.c_proj.weight"] + w[hp + "mlp.c_proj.bias"]
            else:
                x = self._norm(hk, p + "ln2", resid, w[hp + "post_attention_layernorm.weight"], None)
                pre = hk(p + "mlp.hook_pre", x @ w[hp + "mlp.gate_proj.weight"].T)
                pre_lin = hk(p + "mlp.hook_pre_linear", x @ w[hp + "mlp.up_proj.weight"].T)
                post = hk(p + "mlp.hook_post", F.silu(pre) * pre_lin)
                mlp_out = post @ w[hp + "mlp.down_proj.weight"].T
            mlp_out = hk(p + "hook_mlp_out", mlp_out)
            resid = hk(p + "hook_resid_post", resid + mlp_out)
        if self.arch == "gpt2":
            x = self._norm(hk, "ln_final", resid, w["ln_f.weight"], w["ln_f.bias"])
        else:
            x = self._norm(hk, "ln_final", resid, w["norm.weight"], None)
        logits = x @ w["lm_head.weight"].T
        assert list(acts) == self.hook_names(), "hook order"
        return logits, acts


def metric_rows(logits, answer, wrong):
    last = logits[:, -1, :]
    r = torch.arange(last.shape[0])
    return last[r, answer.long()] - last[r, wrong.long()]


# ---------------------------------------------------------------------------------------------
# grid nodes

def grid_shape(tl, kind):
    if kind in GRID_RESID:
        return (tl.L, T)
    if kind == "attn.hook_pattern":
        return (tl.L, tl.H)
    return (tl.L, T, tl.KV if kind in ("attn.hook_k", "attn.hook_v") else tl.H)


def grid_nodes(tl, kind):
    """(index in the grid, hook name, index into the activation with the batch axis sliced)."""
    shape = grid_shape(tl, kind)
    for idx in np.ndindex(*shape):
        L = idx[0]
        name = f"blocks.{L}.{kind}"
        if kind in GRID_RESID:
            sel = (slice(None), idx[1])  # [:, pos, :]
        elif kind == "attn.hook_pattern":
            sel = (slice(None), idx[1])  # [:, head, :, :]
        else:
            sel = (slice(None), idx[1], idx[2])  # [:, pos, head, :]
        yield idx, name, sel


def patch_fn(sel, src):
    def f(x):
        x = x.clone()
        x[sel] = src[sel]
        return x
    return f


# ---------------------------------------------------------------------------------------------

def load_hf(name):
    d = os.path.join(FIXTURES, name)
    cls = GPT2LMHeadModel if name.startswith("gpt2") else LlamaForCausalLM
    return cls.from_pretrained(d, attn_implementation="eager", torch_dtype=torch.float64).eval()


def hf_reference(name, hf, tokens):
    """HF logits and hook values recorded on the HF modules (the existing fixtures' conventions)."""
    if name.startswith("gpt2"):
        g2.B, g2.T = tokens.shape  # reference_run reads the batch shape from module globals
        ref = g2.reference_run(hf, tokens)
        logits = ref.pop("logits")
        for k in ("loss", "per_seq_loss"):
            ref.pop(k)
        return ref, logits
    with gl.exact_float64(hf):
        return gl.reference_hooks(hf, tokens)


def check_against_hf(name, hf, tl, tokens, label):
    ref, hf_logits = hf_reference(name, hf, tokens)
    with torch.no_grad():
        logits, acts = tl.forward(tokens)
    check_close(f"{label}: logits vs HF", logits, hf_logits)
    assert set(ref) == set(acts), (sorted(set(ref) ^ set(acts)))
    for k in acts:
        check_close(f"{label}: {k} vs HF-recorded", acts[k], ref[k].to(torch.float64))
    mr = gl.max_rel(logits, hf_logits)
    return mr


def check_against_committed(name, tl):
    """The committed reference.safetensors (float32-stored) on its own tokens."""
    d = os.path.join(FIXTURES, name)
    ref = load_file(os.path.join(d, "reference.safetensors"))
    tokens = ref["tokens"]
    with torch.no_grad():
        logits, acts = tl.forward(tokens)
    worst = 0.0
    n = 0
    for k, v in ref.items():
        if k in acts:
            e = gl.nmse(v, acts[k])
            worst = max(worst, e)
            n += 1
    assert n == len(acts), (n, len(acts))
    e = gl.max_rel(ref["logits"], logits)
    assert worst < 1e-12 and e < 1e-6, (worst, e)
    return worst, e


def make_batches(tl, seed):
    """Seeded clean tokens; the corrupted batch replaces CORRUPT_POS. answer = clean top-1 at the last
    position, wrong = corrupted top-1 other than answer. Of a few seeds the first whose clean and
    corrupted metrics are both well away from zero (|metric| > 0.5 in every row, with opposite signs)."""
    for attempt in range(200):
        g = torch.Generator().manual_seed(seed + attempt)
        clean = torch.randint(0, tl.V, (B, T), generator=g).to(torch.int32)
        corr = clean.clone()
        for p in CORRUPT_POS:
            corr[:, p] = torch.randint(0, tl.V, (B,), generator=g).to(torch.int32)
        if (corr[:, list(CORRUPT_POS)] == clean[:, list(CORRUPT_POS)]).any():
            continue
        with torch.no_grad():
            lc, _ = tl.forward(clean)
            lk, _ = tl.forward(corr)
        answer = lc[:, -1].argmax(-1)
        k2 = lk[:, -1].clone()
        k2[torch.arange(B), answer] = -float("inf")
        wrong = k2.argmax(-1)
        mc, mk = metric_rows(lc, answer, wrong), metric_rows(lk, answer, wrong)
        if (mc > 0.5).all() and (mk < -0.5).all():
            return clean, corr, answer.to(torch.int32), wrong.to(torch.int32), seed + attempt
    raise RuntimeError("no batch found")


def richardson(f, h=FD_EPS):
    """f'(0) from central differences at h and h/2 with one Richardson step."""
    d1 = (f(h) - f(-h)) / (2 * h)
    d2 = (f(h / 2) - f(-h / 2)) / h
    return (4 * d2 - d1) / 3


def compact_json(info):
    """One line per entry (and per tensor under "keys"), so the file stays short and diffable."""
    lines = []
    for k, v in info.items():
        if k == "keys":
            inner = ",\n".join(f"  {json.dumps(n)}: {json.dumps(d)}" for n, d in v.items())
            lines.append(f" {json.dumps(k)}: {{\n{inner}\n }}")
        else:
            lines.append(f" {json.dumps(k)}: {json.dumps(v)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def make_fixture(name, outdir):
    arch = "gpt2" if name.startswith("gpt2") else "llama"
    hf = load_hf(name)
    tl = TLForward(hf, arch)
    info = {"model": f"tests/fixtures/{name}", "arch": arch}

    worst_committed, lr_committed = check_against_committed(name, tl)
    print(f"[{name}] vs committed reference.safetensors: hook nmse <= {worst_committed:.1e}, logits max_rel "
          f"{lr_committed:.1e}")

    clean, corr, answer, wrong, seed = make_batches(tl, SEEDS[name])
    mr = [check_against_hf(name, hf, tl, t, lab) for t, lab in ((clean, "clean"), (corr, "corrupted"))]
    print(f"[{name}] re-implementation vs HF float64: logits max_rel {max(mr):.1e}, every hook within 1e-10")
    if arch == "llama":
        with torch.no_grad():
            plain = hf(input_ids=clean.long(), use_cache=False).logits
            mine, _ = tl.forward(clean)
        info["plain_hf_float64_logits_max_rel"] = gl.max_rel(plain, mine)
        print(f"[{name}] plain HF float64 (float32 islands) vs this float64: max_rel "
              f"{info['plain_hf_float64_logits_max_rel']:.1e}")

    # the two runs; gradient of the corrupted-run metric with respect to every hook
    with torch.no_grad():
        lc, act_c = tl.forward(clean)
    tl.requires_grad(True)
    lk, act_k = tl.forward(corr)
    names = tl.hook_names()
    m_rows_k = metric_rows(lk, answer, wrong)
    m_k = m_rows_k.mean()
    grads = torch.autograd.grad(m_k, [act_k[n] for n in names])
    tl.requires_grad(False)
    grad = {}
    for n, g in zip(names, grads):
        g = g.detach().clone()
        if n.endswith("hook_attn_scores"):
            masked = torch.isinf(act_k[n])
            assert (g[masked] == 0).all(), f"{n}: non-zero gradient at a masked score"
            g[masked] = 0.0
        assert torch.isfinite(g).all(), n
        grad[n] = g
    act_k = {k: v.detach() for k, v in act_k.items()}
    lk = lk.detach()
    m_rows_c = metric_rows(lc, answer, wrong)
    m_c, m_k = m_rows_c.mean().item(), m_k.item()
    print(f"[{name}] seed {seed}: metric clean {m_c:.6f}, corrupted {m_k:.6f}; rows clean "
          f"{m_rows_c.tolist()}, corrupted {m_rows_k.tolist()}")

    def metric(edits):
        with torch.no_grad():
            lg, _ = tl.forward(corr, edits)
        return metric_rows(lg, answer, wrong).mean().item()

    # self-check: patching blocks.0.hook_resid_pre everywhere with clean gives the clean metric exactly
    m_all = metric({"blocks.0.hook_resid_pre": lambda x: act_c["blocks.0.hook_resid_pre"].clone()})
    assert m_all == m_c, (m_all, m_c)
    info["check_patch_all_resid_pre0_equals_clean"] = True

    # gradient check: every hook, central difference along a seeded random direction
    gdir = torch.Generator().manual_seed(SEED_DIRS)
    worst_fd = (0.0, "")
    for n in names:
        x0 = act_k[n]
        d = torch.randn(x0.shape, generator=gdir, dtype=torch.float64)
        if n.endswith("hook_attn_scores"):
            d[torch.isinf(x0)] = 0.0
        if n.endswith("hook_scale"):
            d = d * x0  # relative steps: scale is a positive divisor
        fd = richardson(lambda e, n=n, d=d: metric({n: lambda x: x + e * d}))
        an = (grad[n] * d).sum().item()
        err = abs(fd - an) / max(1.0, abs(an))
        if err > worst_fd[0]:
            worst_fd = (err, n)
        assert err < 1e-9, f"{n}: gradient {an} vs finite difference {fd}"
    info["check_grad_vs_central_difference_worst_rel"] = worst_fd[0]
    print(f"[{name}] gradients vs central differences (h {FD_EPS}, Richardson) along random directions, {len(names)} hooks: "
          f"worst rel error {worst_fd[0]:.1e} ({worst_fd[1]})")

    # exact patching and AtP over the grid
    tensors = {}
    worst_atp_fd = (0.0, "")
    n_nodes = 0
    for kind in GRID_KINDS:
        shape = grid_shape(tl, kind)
        patch = np.zeros(shape)
        atp = np.zeros(shape)
        for idx, hname, sel in grid_nodes(tl, kind):
            n_nodes += 1
            c, k = act_c[hname], act_k[hname]
            patch[idx] = metric({hname: patch_fn(sel, c)})
            own = metric({hname: patch_fn(sel, k)})
            assert own == m_k, f"{hname}{idx}: patching with the corrupted value gives {own} != {m_k}"
            delta = (c - k)[sel]
            atp[idx] = (delta * grad[hname][sel]).sum().item()
            # AtP is the derivative of exact patching along (clean - corrupted)

            def step(e, sel=sel, c=c, k=k):
                def f(x):
                    x = x.clone()
                    x[sel] = k[sel] + e * (c[sel] - k[sel])
                    return x
                return f
            fd = richardson(lambda e, hname=hname, step=step: metric({hname: step(e)}))
            err = abs(fd - atp[idx]) / max(1.0, abs(atp[idx]))
            if err > worst_atp_fd[0]:
                worst_atp_fd = (err, f"{hname}{idx[1:]}")
            assert err < 1e-9, f"{hname}{idx}: atp {atp[idx]} vs directional difference {fd}"
        tensors["patch." + kind] = torch.from_numpy(patch)
        tensors["atp." + kind] = torch.from_numpy(atp)
    info["check_patch_self_equals_corrupted_nodes"] = n_nodes
    info["check_atp_vs_central_difference_worst_rel"] = worst_atp_fd[0]
    print(f"[{name}] {n_nodes} grid nodes: patching with the corrupted value gives the corrupted metric bit for bit")
    print(f"[{name}] AtP vs central difference of exact patching along (clean - corrupted), h {FD_EPS}, Richardson: "
          f"worst rel error {worst_atp_fd[0]:.1e} ({worst_atp_fd[1]})")

    atp_corr = {}
    for kind in GRID_KINDS:
        ex = tensors["patch." + kind].flatten() - m_k
        at = tensors["atp." + kind].flatten()
        atp_corr[kind] = round(torch.corrcoef(torch.stack([ex, at]))[0, 1].item(), 4)
    print(f"[{name}] (information) correlation of AtP with exact patching: {atp_corr}")

    # a linear node: the metric is affine in ln_final.hook_normalized, so AtP is exact there
    hname = "ln_final.hook_normalized"
    worst_lin = 0.0
    for pos in range(T):
        sel = (slice(None), pos)
        ex = metric({hname: patch_fn(sel, act_c[hname])}) - m_k
        at = ((act_c[hname] - act_k[hname])[sel] * grad[hname][sel]).sum().item()
        worst_lin = max(worst_lin, abs(ex - at))
        assert abs(ex - at) < 1e-9 * max(1.0, abs(ex)), (pos, ex, at)
        if pos < T - 1:
            assert ex == 0.0 and at == 0.0, (pos, ex, at)
    ex = metric({hname: lambda x: act_c[hname].clone()}) - m_k
    at = ((act_c[hname] - act_k[hname]) * grad[hname]).sum().item()
    worst_lin = max(worst_lin, abs(ex - at))
    assert abs(ex - at) < 1e-9 * max(1.0, abs(ex)), (ex, at)
    info["check_linear_node_atp_minus_patch_max_abs"] = worst_lin
    print(f"[{name}] at {hname} (metric affine): |AtP - exact patching| <= {worst_lin:.1e}")

    # the fixture
    tensors["tokens.clean"] = clean.contiguous()
    tensors["tokens.corrupted"] = corr.contiguous()
    tensors["answer"] = answer.contiguous()
    tensors["wrong"] = wrong.contiguous()
    tensors["metric.clean"] = torch.tensor([m_c], dtype=torch.float64)
    tensors["metric.corrupted"] = torch.tensor([m_k], dtype=torch.float64)
    tensors["metric_rows.clean"] = m_rows_c.detach().clone()
    tensors["metric_rows.corrupted"] = m_rows_k.detach().clone()
    tensors["logits_last.clean"] = lc[:, -1].to(torch.float32).contiguous()
    tensors["logits_last.corrupted"] = lk[:, -1].to(torch.float32).contiguous()
    for n in names:
        tensors["grad." + n] = grad[n].to(torch.float32).contiguous()
    grid_hooks = sorted({h for kind in GRID_KINDS for _, h, _ in grid_nodes(tl, kind)}, key=names.index)
    for h in grid_hooks:
        tensors["clean." + h] = act_c[h].to(torch.float32).contiguous()
        tensors["corrupted." + h] = act_k[h].to(torch.float32).contiguous()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    path = os.path.join(outdir, name + ".safetensors")
    save_file(tensors, path, metadata={"format": "pt"})

    info.update({
        "batch": B, "seq": T, "seed": seed, "corrupted_positions": list(CORRUPT_POS),
        "tokens_clean": clean.tolist(), "tokens_corrupted": corr.tolist(),
        "answer": answer.tolist(), "wrong": wrong.tolist(),
        "metric": "mean over rows b of logits[b, T-1, answer[b]] - logits[b, T-1, wrong[b]] (no BOS, no softmax)",
        "metric_pos": T - 1, "metric_clean": m_c, "metric_corrupted": m_k,
        "grad": "d metric(corrupted run) / d hook value, every hook; hook_attn_scores zero where masked; "
                "hook_pattern is the full autograd gradient (non-zero above the diagonal: v_k . dz_q)",
        "patch": "metric of the corrupted run with the node replaced by its clean value in every row; "
                 "resid/attn_out/mlp_out nodes are (layer, pos) over d_model; z/q/k/v are (layer, pos, head) over "
                 "d_head (k/v: kv heads, before rotary); pattern is (layer, head) over [query, key]",
        "atp": "sum over the node's rows and features of (clean - corrupted) * grad: the linear estimate of "
               "patch - metric.corrupted",
        "atp_vs_patch_correlation": atp_corr,
        "grid_kinds": list(GRID_KINDS),
        "keys": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in sorted(tensors.items())},
        "n_layers": tl.L, "n_heads": tl.H, "n_kv_heads": tl.KV, "d_head": tl.DH, "d_model": tl.D, "vocab": tl.V,
    })
    with open(os.path.join(outdir, name + ".json"), "w") as f:
        f.write(compact_json(info))
    size = os.path.getsize(path) + os.path.getsize(os.path.join(outdir, name + ".json"))
    print(f"[{name}] {len(tensors)} tensors, {size} bytes ({size / 2**20:.2f} MiB)")
    return size


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[3], file=sys.stderr)
        sys.exit(2)
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    total = sum(make_fixture(n, outdir) for n in ("gpt2-tiny", "llama-tiny"))
    print(f"total: {total} bytes ({total / 2**20:.2f} MiB)")
    assert total < 1.5 * 2**20, "fixtures too large"


if __name__ == "__main__":
    main()
