"""t5kit's own CPU kernel (inference/cpu_kernel.py, cpu_linear.c; issue 19): y = x W^T over 32-row
panels, for every tile the kernel has (rows 1-29: the 12-, 8-, 4-, 3-, 2- and 1-row paths), widths
that leave a partial panel and depths that leave a partial chunk of k, with the float64 product's
values to within the rounding of F.linear's own fp32 sums, each row's result independent of the
other rows of the call; and a clear reason where it cannot build."""

import re
import threading

import pytest
import torch
import torch.nn.functional as F

from t5kit.inference import cpu, cpu_kernel

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason=f"no kernel: {cpu_kernel.unavailable_reason()}")


@needs_kernel
@pytest.mark.parametrize("out_f, in_f", [(96, 768), (100, 37), (33, 300), (7, 3072)])
def test_kernel_equals_the_float64_product(out_f, in_f):
    gen = torch.Generator().manual_seed(out_f + in_f)
    w = torch.randn(out_f, in_f, generator=gen)
    panels = cpu_kernel.to_panels(w)
    assert panels.shape == (-(-out_f // 32), in_f, 32)
    for rows in (*range(0, 17), 24, 29):
        x = torch.randn(rows, in_f, generator=gen)
        want = x.double() @ w.double().T
        got = cpu_kernel.linear(x, panels, out_f)
        assert got.shape == (rows, out_f) and got.dtype == torch.float32
        if rows:
            # fp32 sums of in_f products: no further from the exact sum than F.linear's (MKL's) rounding,
            # with room for another summation order
            bound = 4 * max((F.linear(x, w).double() - want).abs().max().item(), 1e-6)
            assert (got.double() - want).abs().max().item() <= bound, rows


@needs_kernel
@pytest.mark.parametrize("in_f", [768, 3072])  # 3,072: multi-row inputs regrouped by chunk of k
def test_a_rows_result_does_not_depend_on_the_other_rows(in_f):
    """Bit for bit: each row alone, every prefix of the batch (all tile sizes: 12, 8, 4, 3, 2, 1) and
    the batch reversed give each row the same outputs, so serve's shared batch decodes a request as
    `generate` does alone."""
    gen = torch.Generator().manual_seed(in_f)
    w = torch.randn(80, in_f, generator=gen)
    panels = cpu_kernel.to_panels(w)
    x = torch.randn(29, in_f, generator=gen)
    full = cpu_kernel.linear(x, panels, 80)
    for rows in range(1, 30):
        assert torch.equal(cpu_kernel.linear(x[:rows], panels, 80), full[:rows]), rows
    assert torch.equal(cpu_kernel.linear(x.flip(0), panels, 80), full.flip(0))
    assert all(torch.equal(cpu_kernel.linear(x[i:i + 1], panels, 80), full[i:i + 1]) for i in range(29))


@needs_kernel
def test_kernel_takes_any_leading_shape_and_runs_from_any_thread():
    """(..., in) -> (..., out), as nn.Linear; serve's scheduler calls it from a thread of its own,
    whose OpenMP default is every core, so the kernel takes PyTorch's thread count as given."""
    w = torch.randn(64, 48)
    layer = cpu.PackedLinear(w, "t5kit")
    x = torch.randn(2, 3, 48)
    want = layer(x)
    assert want.shape == (2, 3, 64)
    torch.testing.assert_close(want, F.linear(x, w), atol=1e-5, rtol=0)
    got = []
    thread = threading.Thread(target=lambda: got.append(layer(x)))
    thread.start()
    thread.join()
    assert torch.equal(got[0], want)
    assert torch.equal(layer(x.transpose(0, 1)), want.transpose(0, 1))  # a non-contiguous input


def test_a_failed_build_leaves_the_layout_out(monkeypatch, tmp_path):
    """No compiler: the reason names the source and the compiler, and layouts are chosen without
    t5kit's (PackedLinear refuses it with the reason); other dtypes never take it."""
    monkeypatch.setenv("T5KIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    lib, why = cpu_kernel._build.__wrapped__()
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert lib is None and "cpu_linear.c" in why and "no-such-cc" in why
    monkeypatch.setattr(cpu_kernel, "_build", lambda: (None, why))
    assert "t5kit" not in cpu.candidates(torch.float32)
    with pytest.raises(ValueError, match="CPU weight layout t5kit is unavailable here: " + re.escape(why)):
        cpu.PackedLinear(torch.randn(8, 8), "t5kit")
    assert "t5kit" not in cpu.candidates(torch.bfloat16)
    monkeypatch.setattr(cpu_kernel, "_build", lambda: (object(), ""))
    with pytest.raises(ValueError, match="CPU weight layout t5kit holds fp32 weights only; got torch.bfloat16"):
        cpu.PackedLinear(torch.randn(8, 8, dtype=torch.bfloat16), "t5kit")
