import torch, time
from scipy import stats
from opdlens.rollout.triton_sampler import sample_tokens_triton
from opdlens.rollout.base import make_generator
gen = make_generator(torch.device("cpu"), 7)
for V, B, T in ((50, 3000, 0.7), (5000, 1500, 1.3)):
    base = torch.randn(V, generator=gen) * 2.5
    x = base[None].expand(B, V).contiguous().to(torch.bfloat16)
    t0 = time.time()
    tok, lp = sample_tokens_triton(x, T, gen)
    ref = torch.log_softmax(x.float() / T, -1)
    err = (lp - ref.gather(1, tok[:, None])[:, 0]).abs().max()
    p = ref[0].exp()
    top = torch.argsort(p, descending=True)[:8]
    cnt = torch.stack([(tok == t).sum() for t in top]).float()
    exp = p[top] * B
    obs = torch.cat([cnt, (B - cnt.sum())[None]]); ex = torch.cat([exp, (B - exp.sum())[None]])
    chi = stats.chisquare(obs.numpy(), ex.numpy())
    print(V, B, "err", float(err), "p", chi.pvalue, "time", time.time() - t0)
    tok2, _ = sample_tokens_triton(x, T, make_generator(torch.device("cpu"), 7))
