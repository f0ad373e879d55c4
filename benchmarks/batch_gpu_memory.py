"""Activation bytes saved for backward per sample of edm2-img64-s (saved-tensor hooks), fp32 and bf16 autocast."""
import sys, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from evodiff_pl.networks import build_network
from evodiff_pl.networks.precond import build_precond
from evodiff_pl.training.losses import LOSSES
torch.manual_seed(0)
back = build_network("edm2unet", preset="img64-s", img_resolution=64, in_channels=3, out_channels=3, label_dim=1000)
net = build_precond("edm2", back, sigma_data=0.5)
nparam = sum(p.numel() for p in net.parameters())
print("params", nparam, flush=True)
loss_fn = LOSSES["edm2"](-0.8, 1.6, 0.5)
for dtype in (None, torch.bfloat16):
    for b in (1, 2, 4):
        seen = {}
        def pack(t):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
            return t
        x = torch.randn(b, 3, 64, 64); lab = torch.arange(b)
        t0 = time.time()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                out = loss_fn(net, x, lab, sigma=torch.full((b,), 1.0), noise=torch.randn_like(x))
        params = {p.untyped_storage().data_ptr() for p in net.parameters()}
        act = sum(v for k, v in seen.items() if k not in params)
        out.loss.sum().backward(); net.zero_grad(set_to_none=True)
        print(f"dtype={dtype} batch={b} saved activations {act/2**20:.1f} MiB ({time.time()-t0:.1f}s)", flush=True)
