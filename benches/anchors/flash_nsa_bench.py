# Times flash-nsa (mdy666/Scalable-Flash-Native-Sparse-Attention, Triton + TMA) HFNSACore,
# paper config (kernel 32, stride 16, block 64, top 16, window 512, mean compression),
# forward and forward+backward, bf16, H = 64, H_kv = 4, D = 128. Its window branch needs
# flash-attn; this script does not: it routes that branch to fla's Triton parallel_attn
# (window), and also times flash-nsa with the window branch removed (zeros), so the two
# numbers bracket flash-nsa with FlashAttention-3's window. Needs flash-nsa's `flash_nsa/`
# package and the fla wheel on PYTHONPATH (see README.md). Not yet run on a GPU: expect to
# adapt it to what it trips on.
import sys, types, argparse
try:
    import pkg_resources  # noqa
except ImportError:
    from packaging.version import parse as _pv
    m = types.ModuleType("pkg_resources"); m.parse_version = _pv; sys.modules["pkg_resources"] = m
try:
    import pandas  # noqa
except ImportError:
    m = types.ModuleType("pandas"); m.Series = dict; sys.modules["pandas"] = m
import torch, triton
from fla.ops.attn.parallel import parallel_attn
import flash_nsa
import flash_nsa.modules.hf_level_nsa as hf
from flash_nsa import NSAConfig, HFNSACore, NSAHelper

W = 512
def swa_fla(q, k, v, sm_scale=None):
    cu = NSAHelper.x_cu_seqlens
    return parallel_attn(q[None], k[None], v[None], scale=sm_scale, window_size=W, cu_seqlens=cu.long() if cu.dtype != torch.long else cu)[0]
def swa_zero(q, k, v, sm_scale=None):
    return (q[..., :v.shape[-1]] * 0)

p = argparse.ArgumentParser()
p.add_argument('--T', type=int, nargs='+', default=[8192, 16384, 32768, 65536])
a = p.parse_args()
print("| T | flash-nsa fwd (fla window) | fwd+bwd | flash-nsa fwd (no window) | fwd+bwd (no window) |")
for T in a.T:
    res = []
    for swa in (swa_fla, swa_zero):
        hf.swa_varlen_func = swa
        cfg = NSAConfig()
        dev, dt = "cuda", torch.bfloat16
        cu = torch.tensor([0, T], device=dev, dtype=torch.int32)
        q = torch.randn(T, 64, 128, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(T, 4, 128, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(T, 4, 128, device=dev, dtype=dt, requires_grad=True)
        w = torch.randn(T, 64, 3, device=dev, dtype=dt, requires_grad=True)
        nsa = HFNSACore(cfg).to(q)
        o = nsa(q, k, v, w, cu)
        do = torch.randn_like(o)
        fwd = triton.testing.do_bench(lambda: nsa(q, k, v, w, cu), warmup=20, rep=100)
        def fb():
            o = nsa(q, k, v, w, cu); o.backward(do)
        both = triton.testing.do_bench(fb, grad_to_none=[q, k, v, w], warmup=10, rep=100)
        res += [fwd, both]
        del q, k, v, w, o, do; torch.cuda.empty_cache()
    print(f"| {T} | " + " | ".join(f"{x:.2f}" for x in res) + " |", flush=True)
