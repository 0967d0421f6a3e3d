"""Probe: fit the super-tokens at prefill time, self-supervised: the dense tail of the context re-read over
[sink | super-tokens] must give the dense model's next-token distributions (KL). Then score the unseen
continuation. SmolLM2, 5 items, 8x budget."""
import math, sys, time, torch
import torch.nn.functional as F
args = sys.argv[1:]
HOLD_NORMS = bool(args) and args[0] == "--hold-norms"  # move only directions (hard normalisation)
args = args[HOLD_NORMS:]
sys.argv = sys.argv[:1] + ["smollm2-135m", "8", "64", "64", "dense"]
exec(open("results/compression/probes/probe_fit.py").read().split("res = {}")[0])
for p in model.parameters():
    p.requires_grad_(False)

def moved(x0, d):
    return F.normalize(x0 + d, dim=-1) * x0.norm(dim=-1, keepdim=True) if HOLD_NORMS else x0 + d

def run(W_, recent_, steps, lr, fit_v=True, fit_k=True):
    nll, n, t0 = 0.0, 0, time.time()
    for it in items:
        ctx, cont = it["context"], it["continuation"]
        T = len(ctx)
        m = (T - sink - recent_) // W_; end = sink + m * W_
        cache = DynamicCache(config=cfg); BIAS.clear()
        with torch.no_grad():
            out = model(input_ids=ctx[None], past_key_values=cache, position_ids=torch.arange(T)[None], logits_to_keep=T - end)
        teacher = out.logits[0].float().log_softmax(-1)  # predictions of tokens end+1..T (the dense tail)
        last = out.logits[0, -1]
        init = []
        for li, layer in enumerate(cache.layers):
            K, V = layer.keys, layer.values
            d = K.shape[-1]
            kw = K[:, :, sink:end].reshape(1, H, m, W_, d); vw = V[:, :, sink:end].reshape(1, H, m, W_, d)
            slot = (li * H + torch.arange(H)).repeat_interleave(m)
            with torch.no_grad():
                kt, vt = sc(kw.reshape(-1, W_, d), vw.reshape(-1, W_, d), slot)
            init.append((K[:, :, :sink], kt.reshape(1, H, m, d), vt.reshape(1, H, m, d), V[:, :, :sink], K[:, :, end:], V[:, :, end:]))
        b = torch.zeros(1, H, sink + m); b[:, :, sink:] = math.log(W_)
        dk = [torch.zeros_like(x[1], requires_grad=fit_k) for x in init]
        dv = [torch.zeros_like(x[2], requires_grad=fit_v) for x in init]
        params = [p for p in dk + dv if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr) if steps else None
        tail = ctx[end:]
        for step in range(steps):
            c = DynamicCache(config=cfg)
            for li, (ks, kt, vt, vs, _, _) in enumerate(init):
                c.update(torch.cat([ks, moved(kt, dk[li])], 2), torch.cat([vs, moved(vt, dv[li])], 2), li)
                BIAS[li] = b
            lo = model(input_ids=tail[None], past_key_values=c, position_ids=torch.arange(end, T)[None]).logits[0].float().log_softmax(-1)
            loss = F.kl_div(lo, teacher, log_target=True, reduction="batchmean")
            opt.zero_grad(); loss.backward(); opt.step()
        # serving cache: sink + fitted super-tokens + dense tail
        c = DynamicCache(config=cfg)
        for li, (ks, kt, vt, vs, kr, vr) in enumerate(init):
            with torch.no_grad():
                c.update(torch.cat([ks, moved(kt, dk[li]), kr], 2), torch.cat([vs, moved(vt, dv[li]), vr], 2), li)
            bb = torch.zeros(1, H, c.layers[li].keys.shape[-2]); bb[:, :, sink:sink + m] = math.log(W_); BIAS[li] = bb
        with torch.no_grad():
            logits = model(input_ids=cont[:-1][None], past_key_values=c, position_ids=torch.arange(T, T + len(cont) - 1)[None]).logits[0]
        logits = torch.cat([last[None], logits]).float()
        nll += float(F.cross_entropy(logits, cont, reduction="sum")); n += len(cont)
        if steps:
            print(f"   item fit loss {float(loss):.4f}", flush=True)
    print(f"W {W_} recent {recent_} steps {steps} lr {lr} k {fit_k} v {fit_v}: ppl {math.exp(nll / n):.3f} ({time.time()-t0:.0f}s)", flush=True)

for spec in args:
    W_, r, steps, lr = spec.split(":")
    run(int(W_), int(r), int(steps), float(lr))
