"""CPU weight layouts (inference/cpu.py, issue 19): every layout gives the unpacked model's logits
and ids, the choice is deterministic for a cached decision, and int8's fused q/k/v equals int8 over
separate q, k and v."""

import copy
import warnings

import pytest
import torch
from conftest import padded_batch

import t5kit
from t5kit.inference import cpu, cpu_kernel, engine

pytestmark = pytest.mark.skipif(not cpu.can_pack(torch.float32), reason="this PyTorch build has no oneDNN")


def _model(seed: int = 0) -> t5kit.T5:
    model = t5kit.T5(t5kit.get_preset("tiny"))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


def _step_logits(model, ids, mask, steps: int = 6) -> torch.Tensor:
    """The cached decode step's fp32 logits (steps, B, V), fed greedy tokens."""
    with torch.inference_mode():
        dec = engine.start(model, ids, mask, 1, steps, "eager")
        tokens = torch.zeros(len(ids), 1, dtype=torch.long)
        out = []
        for _ in range(steps):
            out.append(dec(tokens))
            tokens = out[-1].argmax(-1, keepdim=True)
        return torch.stack(out)


def _linear_shapes(model) -> set[tuple[int, int]]:
    return {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}


def _decoding_linears(packed) -> list:
    """The PackedLinears a decode step calls (decoder and LM head), whose layout is chosen per shape;
    those that read the source (the encoder's, cross-attention's k and v) always hold the default
    packing (`pack_linears`), which this checks."""
    source = [*packed.encoder.modules(), *(m for blk in packed.decoder.blocks for m in (blk.cross.k, blk.cross.v))]
    assert all(m.layout == cpu.DEFAULT_LAYOUT for m in source if isinstance(m, cpu.PackedLinear))
    return [m for m in packed.modules() if isinstance(m, cpu.PackedLinear) and all(m is not s for s in source)]


@pytest.mark.parametrize("layout", cpu.LAYOUTS)
def test_every_layout_gives_the_same_logits(layout):
    if layout not in cpu.candidates(torch.float32):
        pytest.skip(f"t5kit's kernel is unavailable here: {cpu_kernel.unavailable_reason()}")
    model = _model()
    ids, mask = padded_batch(model.config.vocab_size, lengths=(13, 7, 3))
    dec_in = torch.randint(0, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want_full, want_steps = model(ids, dec_in, mask), _step_logits(model, ids, mask)
        want_one = _step_logits(model, ids[:1], mask[:1])  # one row a call: onednn_pad4 pads it to 4
    want_ids = model.generate(ids, mask, max_new_tokens=8)
    packed = cpu.pack_linears(copy.deepcopy(model), layouts=layout)
    linears = [m for m in packed.modules() if isinstance(m, cpu.PackedLinear)]
    assert linears and all(m.layout == layout for m in linears)
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert all(blk.attn.qkv is not None and blk.attn.q is None for blk in packed.decoder.blocks)  # fused
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids, dec_in, mask), want_full, atol=1e-5, rtol=0)  # uncached pass
        torch.testing.assert_close(_step_logits(packed, ids, mask), want_steps, atol=1e-5, rtol=0)  # decode step
        torch.testing.assert_close(_step_logits(packed, ids[:1], mask[:1]), want_one, atol=1e-5, rtol=0)
    assert torch.equal(packed.generate(ids, mask, max_new_tokens=8), want_ids)


def test_layout_choice_is_deterministic_for_a_cached_decision(monkeypatch, tmp_path):
    """With a decision cached for every shape, packing times nothing and lays each weight out as
    decided, every time; with none, each shape is timed once and the fastest (by `fastest`) kept."""
    model = _model()
    assert model.lm_head is not None  # untied (v1.1): every Linear is the model's own
    shapes = sorted(_linear_shapes(cpu.fuse_qkv(copy.deepcopy(model))))
    decided = {cpu.layout_key(s, torch.float32): cpu.LAYOUTS[i % len(cpu.LAYOUTS)] for i, s in enumerate(shapes)}
    monkeypatch.setattr(cpu, "_CHOSEN", dict(decided))
    monkeypatch.setenv("T5KIT_CPU_LAYOUT", "timed")

    def no_timing(*args, **kw):
        raise AssertionError("a cached decision was timed again")
    monkeypatch.setattr(cpu, "time_layouts", no_timing)
    for _ in range(2):
        packed = cpu.pack_linears(copy.deepcopy(model))
        got = {(m.out_features, m.in_features): m.layout for m in _decoding_linears(packed)}
        assert got == {s: decided[cpu.layout_key(s, torch.float32)] for s in shapes}  # the decoder has every shape

    timed = []

    def fake_timing(shape, dtype):
        timed.append(shape)
        if shape[0] > 100:  # plain is fastest at one row; the faster b1 hint costs 16-row calls
            return {"onednn": {1: 1.0, 16: 2.0}, "onednn_b1": {1: 0.4, 16: 2.5}, "onednn_pad4": {1: 0.8, 16: 2.0},
                    "plain": {1: 0.5, 16: 1.9}}
        return {"onednn": {1: 1.0, 16: 2.0}, "onednn_b1": {1: 0.95, 16: 2.0}, "onednn_pad4": {1: 0.93, 16: 2.0},
                "plain": {1: 1.2, 16: 1.0}}  # within the margin at one row: the default stays
    monkeypatch.setattr(cpu, "_CHOSEN", {})
    monkeypatch.setattr(cpu, "time_layouts", fake_timing)
    monkeypatch.setenv("T5KIT_CACHE_DIR", str(tmp_path))  # nothing saved by earlier processes
    packed = cpu.pack_linears(copy.deepcopy(model))
    assert sorted(timed) == shapes  # each shape once, however many weights share it
    assert all(m.layout == ("plain" if m.out_features > 100 else "onednn") for m in _decoding_linears(packed))


def test_decisions_are_saved_for_the_next_process(monkeypatch, tmp_path):
    """A decision is timed once per CPU model, kernel set, thread count, dtype and shape and saved
    ($T5KIT_CACHE_DIR/cpu-layouts.json): the next process (here: an empty in-process table) reads
    it and times nothing. A file written under another rule, or unreadable, is timed anew;
    T5KIT_CPU_LAYOUT=timed times anew and saves."""
    import json
    monkeypatch.setenv("T5KIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("T5KIT_CPU_LAYOUT", raising=False)
    timed = []

    def fake_timing(shape, dtype):
        timed.append(shape)
        return {"onednn": {1: 1.0, 16: 2.0}, "onednn_b1": {1: 0.95, 16: 3.0}, "onednn_pad4": {1: 0.5, 16: 2.0},
                "plain": {1: 2.0, 16: 2.0}}
    monkeypatch.setattr(cpu, "time_layouts", fake_timing)
    model = _model()
    shapes = _linear_shapes(cpu.fuse_qkv(copy.deepcopy(model)))

    def pack():
        monkeypatch.setattr(cpu, "_CHOSEN", {})  # a new process
        return {m.layout for m in _decoding_linears(cpu.pack_linears(copy.deepcopy(model)))}

    assert pack() == {"onednn_pad4"} and sorted(timed) == sorted(shapes)
    saved = json.loads((tmp_path / "cpu-layouts.json").read_text())
    assert saved["rule"] == cpu._rule() and set(saved["layouts"].values()) == {"onednn_pad4"}
    assert len(saved["layouts"]) == len(shapes)
    timed.clear()
    assert pack() == {"onednn_pad4"} and timed == []  # read back, nothing timed
    (tmp_path / "cpu-layouts.json").write_text(json.dumps({**saved, "rule": "another rule"}))
    assert pack() == {"onednn_pad4"} and len(timed) == len(shapes)  # another rule: timed anew
    (tmp_path / "cpu-layouts.json").write_text("{not json")
    timed.clear()
    assert pack() == {"onednn_pad4"} and len(timed) == len(shapes)
    timed.clear()
    monkeypatch.setenv("T5KIT_CPU_LAYOUT", "timed")
    assert pack() == {"onednn_pad4"} and len(timed) == len(shapes)  # saved decisions ignored


def test_layout_timing_runs_every_layout():
    seconds = cpu.time_layouts((48, 32), torch.float32, rounds=1)
    assert set(seconds) == set(cpu.candidates(torch.float32))
    assert set(cpu.LAYOUTS) - set(seconds) <= {"t5kit"} and ("t5kit" in seconds) == cpu_kernel.available()
    assert all(set(t) == set(cpu.TIMED_ROWS) and all(0 < s < 1 for s in t.values()) for t in seconds.values())
    assert cpu.fastest(seconds) in cpu.LAYOUTS


def test_int8_fused_qkv_equals_separate():
    """The three projections share their input, so one dynamic activation scale serves the fused
    GEMV as each of its parts, and the weights quantize per output channel: fusing changes nothing."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = _model(seed=3)
    ids, mask = padded_batch(model.config.vocab_size, lengths=(11, 4))
    fused = cpu.quantize_int8(copy.deepcopy(model))
    assert all(blk.attn.qkv is not None for blk in fused.decoder.blocks)
    separate = copy.deepcopy(model)
    cpu._own_lm_head(separate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        separate = quantize_dynamic(separate, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    torch.testing.assert_close(_step_logits(fused, ids, mask), _step_logits(separate, ids, mask), atol=1e-5, rtol=0)


def test_layout_from_the_environment(monkeypatch):
    monkeypatch.setattr(cpu, "_CHOSEN", {})
    monkeypatch.setenv("T5KIT_CPU_LAYOUT", "plain")
    packed = cpu.pack_linears(_model())
    assert {m.layout for m in packed.modules() if isinstance(m, cpu.PackedLinear)} == {"plain"}
    assert cpu._CHOSEN == {}  # nothing timed nor cached
    monkeypatch.setenv("T5KIT_CPU_LAYOUT", "fast")
    want = "T5KIT_CPU_LAYOUT='fast': expected one of onednn, onednn_b1, onednn_pad4, plain, t5kit or timed"
    with pytest.raises(ValueError, match=want):
        cpu.pack_linears(_model())


def test_encoder_weights_hold_the_default_packing():
    """The encoder's Linears run every token of a batch at once: oneDNN's default packing whatever a
    decode step's timing chose for their shape (`pack_linears`), and a T5Encoder (`t5kit embed`)
    packs all its Linears so, with the unpacked encoder's output."""
    model = _model()
    ids, mask = padded_batch(model.config.vocab_size, lengths=(13, 7, 3))
    shapes = _linear_shapes(model.encoder)
    packed = cpu.pack_linears(copy.deepcopy(model), layouts=dict.fromkeys(shapes, "plain"))
    assert {m.layout for m in _decoding_linears(packed) if (m.out_features, m.in_features) in shapes} == {"plain"}
    enc = t5kit.T5Encoder(model.config)
    enc.load_state_dict({k: v for k, v in model.state_dict().items() if k.split(".")[0] in ("shared", "encoder")})
    enc.eval()
    with torch.inference_mode():
        want = enc(ids, mask)
        fast = cpu.for_inference(enc)
        assert fast is enc and not any(isinstance(m, torch.nn.Linear) for m in fast.modules())
        assert {m.layout for m in fast.modules() if isinstance(m, cpu.PackedLinear)} == {cpu.DEFAULT_LAYOUT}
        torch.testing.assert_close(fast(ids, mask), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(packed.encode(ids, mask), want, atol=1e-5, rtol=0)


def test_decisions_are_kept_apart_per_kernel_set(monkeypatch):
    """A decision holds for the kernels it was timed with: capping oneDNN's ISA (ONEDNN_MAX_CPU_ISA,
    as the AVX2 proxy runs do) gives another key, so decisions timed with AVX-512 kernels are not
    reused with AVX2 ones (t5-base greedy batch 1 with AVX2 kernels: 0.75x CTranslate2 over the
    reused decisions, 0.91x timed anew; one run each)."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    full = cpu.layout_key((768, 768), torch.float32)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = cpu.layout_key((768, 768), torch.float32)
    assert capped != full and "AVX2" in capped[1] and full[0] == capped[0]
