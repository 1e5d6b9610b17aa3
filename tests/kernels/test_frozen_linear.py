"""The frozen quantized linear: forward and input gradient against the torch reference (Triton path under the
interpreter on CPU), what autograd keeps for it against what it keeps for F.linear with a frozen weight, and
a small LoRA model trained on NF4 frozen weights against the same run on a bf16 base."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from memtune.kernels import frozen_linear as FL
from memtune.kernels import triton_usable

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = triton_usable(DEV)


def _saved(fn):
    """Tensors autograd saves while fn runs: (shape, dtype, storage pointer) each."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


def test_what_autograd_keeps_for_a_frozen_linear():
    """Measured on torch's own linear: for a frozen W and an x that wants a gradient, autograd keeps W^T (a
    view of the parameter: no new bytes) and not x; under autocast it keeps the 16-bit copy of an fp32 W, a
    second copy of every weight from forward to backward. Ours keeps no tensor at all."""
    w = torch.randn(48, 32)
    x = torch.randn(4, 5, 32, requires_grad=True)
    saved, _ = _saved(lambda: F.linear(x, w))
    assert len(saved) == 1 and saved[0][:2] == ((32, 48), torch.float32)
    assert saved[0][2] == w.untyped_storage().data_ptr()  # the parameter itself, no new storage
    assert all(s[2] != x.untyped_storage().data_ptr() for s in saved)  # x is not kept
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved_ac, _ = _saved(lambda: F.linear(x, w))
    assert len(saved_ac) == 1 and saved_ac[0][1] == torch.bfloat16
    assert saved_ac[0][2] != w.untyped_storage().data_ptr()  # a new bf16 copy of W, alive until backward
    for fmt in FL.FORMATS:
        q = FL.quantize_weight(w, fmt, backend="torch")
        saved_q, y = _saved(lambda q=q: FL.frozen_linear(x, q, workspace=FL.Workspace(), backend="torch"))
        assert saved_q == [] and y.requires_grad
        with torch.autocast("cpu", dtype=torch.bfloat16):
            saved_q, y = _saved(lambda q=q: FL.frozen_linear(x, q, backend="torch"))
        assert saved_q == [] and y.dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(7, 33), (3, 64), (128, 4097)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_bf16_format_roundtrip(shape, dtype):
    w = (torch.randn(shape) * 0.05).to(dtype)
    q = FL.quantize_weight(w, "bf16")
    assert q.nbytes == FL.stored_bytes("bf16", shape) == 2 * w.numel() and q.dtype == dtype
    back = q.dequantize()
    assert back.dtype == dtype and back.shape == w.shape
    bound = w.float().abs() * 2.0**-8 + (2.0**-14 if dtype == torch.float16 else 0.0)  # half a bf16 ulp
    assert ((back.float() - w.float()).abs() <= bound).all()
    if dtype == torch.bfloat16:
        assert torch.equal(back, w) and q.data.data_ptr() != w.data_ptr()  # exact, and a copy


CASES = [(fmt, "dequant") for fmt in FL.FORMATS] + [("nf4", "fused")]


@pytest.mark.skipif(not TRITON, reason="triton can't run here")
@pytest.mark.parametrize("fmt,kernel", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_grad_match_reference(fmt, kernel, dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 70, generator=g) * 0.05
    q = FL.quantize_weight(w.to(DEV), fmt, backend="triton")
    bias = (torch.randn(40, generator=g) * 0.1).to(DEV, dtype).requires_grad_()
    x = torch.randn(3, 5, 70, generator=g).to(DEV, dtype).requires_grad_()
    ws = FL.Workspace()
    y = FL.frozen_linear(x, q, bias, workspace=ws, backend="triton", kernel=kernel)
    dy = torch.randn(y.shape, generator=g).to(DEV, dtype)
    dx, db = torch.autograd.grad(y, (x, bias), dy)
    xr, br = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    yr = FL.reference_linear(xr, q, br)
    dxr, dbr = torch.autograd.grad(yr, (xr, br), dy)
    assert y.shape == (3, 5, 40) and y.dtype == dx.dtype == dtype and dx.shape == x.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, yr, **tol)
    torch.testing.assert_close(dx, dxr, **tol)
    torch.testing.assert_close(db, dbr, **tol)
    if kernel == "fused" or (fmt == "bf16" and dtype == torch.bfloat16):
        assert ws.nbytes == 0  # used as stored / dequantized inside the GEMM
    else:
        assert ws.nbytes == 40 * 70 * torch.tensor([], dtype=dtype).element_size()


def test_autocast_dtypes_and_no_input_grad():
    w = torch.randn(16, 8)
    q = FL.quantize_weight(w, "nf4", backend="torch")
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = FL.frozen_linear(x, q, backend="torch")
        ref = F.linear(x, q.dequantize(torch.float32, backend="torch"))
    assert y.dtype == ref.dtype == torch.bfloat16  # as F.linear computes under autocast
    (dx,) = torch.autograd.grad(y.float().sum(), x)
    assert dx.dtype == torch.float32  # the input's dtype
    y2 = FL.frozen_linear(torch.randn(4, 8), q, backend="torch")  # nothing wants a gradient: no graph
    assert not y2.requires_grad and y2.grad_fn is None


def test_workspace_is_shared_and_grows_to_the_largest():
    ws = FL.Workspace()
    small = FL.quantize_weight(torch.randn(8, 16), "int8", backend="torch")
    big = FL.quantize_weight(torch.randn(32, 16), "nf4", backend="torch")
    x = torch.randn(3, 16)
    a = FL.frozen_linear(x, small, workspace=ws, backend="torch")
    b = FL.frozen_linear(x, big, workspace=ws, backend="torch")
    c = FL.frozen_linear(x, small, workspace=ws, backend="torch")
    assert ws.nbytes == 32 * 16 * 4  # one buffer, the largest layer's
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(b, x @ big.dequantize(torch.float32, backend="torch").t())
    assert FL.stored_bytes("nf4", (32, 16)) == big.nbytes and FL.stored_bytes("int8", (8, 16)) == small.nbytes


# --- a small LoRA model: NF4 frozen base against a bf16 base ---------------------------------------------


class LoRALinear(nn.Module):
    def __init__(self, i, o, r=8):
        super().__init__()
        self.base = nn.Linear(i, o)
        self.base.requires_grad_(False)
        self.A = nn.Linear(i, r, bias=False)
        self.B = nn.Linear(r, o, bias=False)
        nn.init.zeros_(self.B.weight)

    def forward(self, x):
        return self.base(x) + self.B(self.A(x))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = LoRALinear(d, 4 * d)
        self.fc2 = LoRALinear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyLoRA(nn.Module):
    def __init__(self, vocab=64, d=64, layers=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.emb.requires_grad_(False)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _train(fmt, steps=100):
    from memtune.patcher import apply_plan

    torch.manual_seed(0)
    model = TinyLoRA()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    undo = apply_plan(model, opt, {"weights": {"format": fmt}})
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        start = torch.randint(64, (16, 1), generator=g)
        stride = torch.randint(1, 4, (16, 1), generator=g)
        data = (start + stride * torch.arange(17)) % 64
        loss = F.cross_entropy(model(data[:, :-1]).reshape(-1, 64), data[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    undo()
    return losses


def test_lora_on_nf4_base_trains_like_a_bf16_base():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend
    try:
        bf16 = _train("bf16")
        nf4 = _train("nf4")
    finally:
        torch.set_num_threads(threads)
    end_bf16, end_nf4 = sum(bf16[-10:]) / 10, sum(nf4[-10:]) / 10
    assert end_bf16 < 0.5 * bf16[0]  # it learned
    assert abs(end_nf4 - end_bf16) <= 0.02 * end_bf16


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,kernel", CASES)
def test_gpu_layer_fine_tuning_shape(fmt, kernel):
    """A 1024 x 2816 layer at 2048 tokens (a scaled-down fine-tuning shape) against the reference."""
    w = torch.randn(2816, 1024, device="cuda") * 0.02
    q = FL.quantize_weight(w, fmt)
    x = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = FL.frozen_linear(x, q, workspace=FL.Workspace(), kernel=kernel)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    xr = x.detach().clone().requires_grad_()
    yr = FL.reference_linear(xr, q)
    (dxr,) = torch.autograd.grad(yr, xr, torch.ones_like(yr))
    torch.testing.assert_close(y.float(), yr.float(), rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(dx.float(), dxr.float(), rtol=2e-2, atol=5e-1)
