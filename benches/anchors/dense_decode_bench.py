# Times one step of dense decoding on one GPU: a query per sequence and head attending every
# cached key (PyTorch SDPA, GQA, bf16), the baseline of `nsa-bench --phase decode`.
# Needs torch with CUDA.
import argparse

import torch
import torch.nn.functional as F


def step_ms(fn, warmup=10, reps=100):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--T', type=int, nargs='+', default=[4096, 16384, 65536, 131072])
    p.add_argument('--B', type=int, nargs='+', default=[1, 32])
    p.add_argument('--HQ', type=int, default=64)
    p.add_argument('--H', type=int, default=4)
    p.add_argument('--D', type=int, default=128)
    a = p.parse_args()
    dev, dt = 'cuda', torch.bfloat16
    print(torch.cuda.get_device_name(), torch.__version__)
    print('B, T, sdpa_decode_step (ms), tokens/s')
    for B in a.B:
        for T in a.T:
            torch.manual_seed(0)
            try:
                q = torch.randn(B, a.HQ, 1, a.D, device=dev, dtype=dt)
                k = torch.randn(B, a.H, T, a.D, device=dev, dtype=dt)
                v = torch.randn(B, a.H, T, a.D, device=dev, dtype=dt)
            except torch.OutOfMemoryError:
                print(f'{B}, {T}, out of memory')
                continue
            # One query at the last position sees every key: no mask.
            ms = step_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            print(f'{B}, {T}, {ms:.4f}, {B / ms * 1e3:.0f}')
            del q, k, v
            torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
