import sys, time, torch, traceback
sys.path.insert(0, 'tests')
import patterncc
from reference import reference_attention, rel_err
print(torch.__version__, torch.cuda.get_device_name())
import triton; print('triton', triton.__version__)
for src in ["window(256) | global([0])", "block(64, width=1) | global(0..128) | random(192, seed=1)", "window(1023) & causal", "window(256) | dilate(2)", "window(8, heads=[0]) | global([5]) & causal"]:
    for dt in (torch.bfloat16, torch.float16):
        try:
            op = patterncc.compile(src, backend="triton")
            T, H, D = 1000, 4, 64
            q, k, v = (torch.randn(2, H, T, D, device='cuda', dtype=dt, requires_grad=True) for _ in range(3))
            t0 = time.time(); out = op(q, k, v); torch.cuda.synchronize(); t1 = time.time() - t0
            ref = reference_attention(q, k, v, op.mask(T, H).cuda())
            g = torch.randn_like(out)
            gs = torch.autograd.grad(out, (q, k, v), g); rs = torch.autograd.grad(ref, (q, k, v), g.double())
            print(src, dt, 'first call %.2fs' % t1, 'err', rel_err(out, ref), [round(rel_err(a, b), 5) for a, b in zip(gs, rs)], flush=True)
        except Exception:
            traceback.print_exc()
