"""FlexAttention path vs its slow twin, SDPA with the materialised bias (issue 8).

On CPU, torch 2.13's FlexAttention runs forward only (compiled here, as the model runs it), so the
CPU tests compare forwards under no_grad; forward + backward equality needs CUDA (marked gpu)."""

import pytest
import torch

import t5kit
from t5kit.model.attention import FlexBias, Keep, attend, backend, use_flex

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gpu(fn):
    return pytest.mark.gpu(cuda(fn))


def tiny(vocab: int = 128, **changes) -> t5kit.T5:
    """Tiny model with a random (not zero) bias table. d_kv 16: FlexAttention's smallest head size."""
    cfg = t5kit.get_preset("tiny").replace(vocab_size=vocab, dropout_rate=0.0, **changes)
    model = t5kit.T5(cfg).eval()
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def both(fn):
    """fn() under the SDPA twin and under FlexAttention, without gradients."""
    with torch.no_grad():
        with backend("sdpa"):
            ref = fn()
        with backend("flex"):
            out = fn()
    return ref, out


def padded(vocab: int, lengths, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=gen)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def packed(vocab: int, segments, seed: int = 0):
    """Rows of packed segment lengths, padded with segment id 0 -> (ids, segment_ids)."""
    gen = torch.Generator().manual_seed(seed)
    n = max(sum(r) for r in segments) + 3  # some padding on every row
    seg = torch.zeros(len(segments), n, dtype=torch.long)
    for i, row in enumerate(segments):
        seg[i, :sum(row)] = torch.repeat_interleave(torch.arange(1, len(row) + 1), torch.tensor(row))
    return torch.randint(3, vocab, seg.shape, generator=gen) * (seg != 0), seg


def test_choice_rule(monkeypatch):
    x = torch.zeros(1)
    assert not use_flex(x, 64, 0.0, needs_grad=False)  # auto: CPU stays on SDPA (measured, see use_flex)
    monkeypatch.setenv("T5KIT_ATTENTION", "flex")
    assert use_flex(x, 64, 0.0, needs_grad=False)
    assert not use_flex(x, 64, 0.0, needs_grad=True)  # no FlexAttention backward on CPU
    assert not use_flex(x, 64, 0.1, needs_grad=False)  # no dropout in FlexAttention
    assert not use_flex(x, 5, 0.0, needs_grad=False)  # head size the kernel cannot tile
    with backend("sdpa"):  # the context manager wins over the environment
        assert not use_flex(x, 64, 0.0, needs_grad=False)
    monkeypatch.setenv("T5KIT_ATTENTION", "fast")
    with pytest.raises(ValueError, match="T5KIT_ATTENTION='fast'"):
        use_flex(x, 64, 0.0, needs_grad=False)
    with pytest.raises(ValueError, match="'sdp'"), backend("sdp"):
        pass


def test_model_picks_the_path(monkeypatch):
    """The stack decides: inference under "flex" builds FlexBias; a model with gradients on CPU, or
    with dropout in training, stays on SDPA even when forced."""
    model = tiny()
    x = torch.randn(2, 5, 64)
    seen = []
    import t5kit.model.t5 as m
    monkeypatch.setattr(m, "attend", lambda q, k, v, bias, p: seen.append(type(bias).__name__) or q)
    with backend("flex"):
        with torch.no_grad():
            model.encoder(x)
        assert set(seen) == {"FlexBias"}
        seen.clear()
        model.encoder(x)  # grad enabled, parameters require grad: CPU backward is missing
        assert set(seen) == {"Tensor"}
        seen.clear()
        dropout = t5kit.T5(t5kit.get_preset("tiny").replace(vocab_size=128)).train()
        with torch.no_grad():
            dropout.encoder(x)
        assert set(seen) == {"Tensor"}


def test_keep_rule_dense_and_blocks_agree_and_skip():
    """One rule two ways: BlockMask.to_dense() marks exactly the blocks the dense mask touches, and
    a padded batch skips the blocks of padding keys."""
    lengths = torch.tensor([300, 100, 20])
    keep = Keep(300, 300, keep_kv=torch.arange(300)[None] < lengths[:, None])
    bm = keep.block_mask(torch.device("cpu"))
    assert bm.BLOCK_SIZE == (128, 128)
    blocks = (bm.kv_num_blocks + bm.full_kv_num_blocks)[:, 0]  # (B, 3 query blocks): kv blocks visited
    assert blocks.tolist() == [[3, 3, 3], [1, 1, 1], [1, 1, 1]]
    dense = keep.dense(torch.device("cpu"))  # (B, 1, K): padding is the same for every query
    assert dense.shape == (3, 1, 300)
    dense = dense.expand(3, 300, 300)
    pad = torch.zeros(3, 384, 384, dtype=torch.bool)
    pad[:, :300, :300] = dense
    any_kept = pad.view(3, 3, 128, 3, 128).any(4).any(2)  # (B, q block, kv block)
    assert torch.equal(bm.to_dense()[:, 0].bool(), any_kept)

    causal = Keep(300, 300, causal=True)
    bm = causal.block_mask(torch.device("cpu"))
    assert bm.kv_num_blocks.shape[0] == 1  # one mask for every row
    assert (bm.kv_num_blocks + bm.full_kv_num_blocks)[0, 0].tolist() == [1, 2, 3]
    assert torch.equal(causal.dense(torch.device("cpu"))[0], torch.ones(300, 300, dtype=torch.bool).tril())

    seg = torch.tensor([[1, 1, 2, 2, 0]])
    packed_keep = Keep(5, 5, keep_kv=seg != 0, seg_q=seg, seg_kv=seg).dense(torch.device("cpu"))[0]
    assert packed_keep.int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0],
                                          [0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="seg_q and seg_kv"):
        Keep(5, 5, seg_q=seg)


def test_encoder_padding_matches_sdpa():
    model = tiny()
    ids, mask = padded(128, (300, 140, 20))  # several 128-blocks; 300 > max_distance 128
    ref, out = both(lambda: model.encode(ids, mask))
    assert (out - ref).abs().max() <= 1e-5  # every query row keeps some key: all rows compare


def test_encoder_packed_segments_match_sdpa():
    """FlexAttention uses kv_idx - q_idx for the bias on every row; SDPA uses positions within each
    segment. They agree wherever a query has keys (not on segment-0 padding rows: see attend)."""
    model = tiny()
    ids, seg = packed(128, [(7, 150, 40), (200,), (3, 3, 120)])
    ref, out = both(lambda: model.encode(ids, segment_ids=seg))
    real = seg != 0
    assert (out - ref)[real].abs().max() <= 1e-5


def test_decoder_causal_and_cross_attention_match_sdpa():
    """Teacher-forced decoder: causal self-attention with decoder padding, cross-attention to a
    padded memory."""
    model = tiny()
    ids, mask = padded(128, (200, 60))
    dec, dec_mask = padded(128, (150, 150), seed=1)
    dec_mask[1, 90:] = 0
    memory = model.encode(ids, mask).detach()
    ref, out = both(lambda: model.decode(dec, memory, mask, attention_mask=dec_mask))
    assert (out - ref).abs().max() <= 1e-5


def test_packed_decoder_and_cross_attention_match_sdpa():
    model = tiny()
    ids, seg = packed(128, [(30, 140), (60, 5)])
    dec, dseg = packed(128, [(20, 130), (40, 4)], seed=1)
    ref, out = both(lambda: model(ids, dec, segment_ids=seg, decoder_segment_ids=dseg))
    assert (out - ref)[dseg != 0].abs().max() <= 1e-5


def test_umt5_per_layer_bias_matches_sdpa():
    model = tiny(model_type="umt5", num_decoder_layers=3)
    assert all(blk.rel_bias is not None for blk in model.encoder.blocks)
    ids, mask = padded(128, (180, 33))
    dec = padded(128, (170, 170), seed=1)[0]
    ref, out = both(lambda: model(ids, dec, mask))
    assert (out - ref).abs().max() <= 1e-5


def test_t5_forward_matches_sdpa_v1_0():
    """v1.0 (ReLU, tied, rescaled logits) through both paths, 2 heads of 32."""
    model = tiny(feed_forward_proj="relu", tie_word_embeddings=True, scale_decoder_outputs=True,
                 num_heads=2, d_kv=32)
    ids, mask = padded(128, (260, 129, 1))
    dec, dec_mask = padded(128, (140, 17, 1), seed=1)
    ref, out = both(lambda: model(ids, dec, mask, decoder_attention_mask=dec_mask))
    assert (out - ref).abs().max() <= 1e-5


def test_dense_training_bias_is_the_table_bias_and_reaches_the_table():
    """Training variant: one dense (H, T, K) bias built from the table, read in score_mod. Its
    forward equals the table lookup inside score_mod, and the dense bias is a function of the table
    (its gradient reaches it; the backward through FlexAttention itself is checked on GPU)."""
    torch.manual_seed(0)
    enc = tiny().encoder
    ar = torch.arange(200)[None]
    keep_kv = torch.arange(200)[None] < torch.tensor([150, 200])[:, None]  # (B, K)
    bm = Keep(200, 200, keep_kv=keep_kv).block_mask(torch.device("cpu"))
    with torch.enable_grad():
        dense = enc.position_biases(ar, ar, bm)[0]
    with torch.no_grad():
        lookup = enc.position_biases(ar, ar, bm)[0]
    assert dense.table is None and dense.dense.shape == (4, 200, 200) and dense.dense.requires_grad
    assert lookup.dense is None and lookup.table is enc.blocks[0].rel_bias.weight
    (grad,) = torch.autograd.grad(dense.dense.square().sum(), enc.blocks[0].rel_bias.weight)
    assert grad.abs().sum() > 0
    q, k, v = torch.randn(3, 2, 4, 200, 16).unbind(0)
    with torch.no_grad():
        assert (attend(q, k, v, FlexBias(bm, dense=dense.dense.detach())) - attend(q, k, v, lookup)).abs().max() <= 1e-5


def test_flex_runs_compiled_under_a_force_eager_stance(monkeypatch):
    """training/loop.py evaluates a --compile run under set_stance("force_eager"); FlexAttention must
    still run compiled there, not as flex_attention's eager reference that materialises the scores
    (issue 17). attention._flex compiles it anew here with a backend that counts the calls into the
    compiled code in place of inductor."""
    import functools

    from t5kit.model import attention
    calls = []

    def counting(gm, example_inputs):
        def run(*args):
            calls.append(len(args))
            return gm(*args)
        return run
    monkeypatch.setattr(attention, "_compiled_flex", {})
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting))
    model = tiny()
    ids, mask = padded(128, (40, 9))
    with torch.compiler.set_stance("force_eager"):
        ref, out = both(lambda: model.encode(ids, mask))
    assert len(calls) == 2  # one per encoder block
    assert (out - ref).abs().max() <= 1e-5


def test_bias_heads_must_be_the_attentions():
    """A bias over other heads than q's (a global table beside one rank's heads) is refused, not
    indexed with the wrong head numbers."""
    bm = Keep(4, 4).block_mask(torch.device("cpu"))
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="bias table .* has 4 heads, the attention 2"):
        attend(q, q, q, FlexBias(bm, torch.zeros(32, 4)))
    with pytest.raises(ValueError, match="dense bias .* has 3 heads, the attention 2"):
        attend(q, q, q, FlexBias(bm, dense=torch.zeros(3, 4, 4)))


def test_flex_refuses_dropout():
    bm = Keep(4, 4).block_mask(torch.device("cpu"))
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="dropout_p=0.1"):
        attend(q, q, q, FlexBias(bm), dropout_p=0.1)


def _train_step_grads(model, ids, mask, dec, labels, seg=None, dseg=None):
    model.zero_grad()
    if seg is None:
        logits = model(ids, dec, mask)
    else:
        logits = model(ids, dec, segment_ids=seg, decoder_segment_ids=dseg)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("packing", [False, True])
def test_gpu_forward_backward_match_sdpa(dtype, tol, packing):
    """Forward and every parameter's gradient (the bias table's included) equal SDPA's on CUDA, in
    training mode without dropout: the dense (H, T, K) bias path. Tolerances relative to the
    largest reference value (bf16: a few ulps of 2^-8)."""
    model = tiny(vocab=256).to("cuda", dtype).train()
    if packing:
        ids, seg = packed(256, [(30, 140), (60, 5)])
        dec, dseg = packed(256, [(20, 130), (40, 4)], seed=1)
        ids, seg, dec, dseg = (t.cuda() for t in (ids, seg, dec, dseg))
        mask, labels = None, dec.masked_fill(dseg == 0, -100)
    else:
        ids, mask = (t.cuda() for t in padded(256, (300, 140, 20)))
        dec, dmask = (t.cuda() for t in padded(256, (150, 90, 150), seed=1))
        seg = dseg = None
        labels = dec.masked_fill(dmask == 0, -100)
    with backend("sdpa"):
        ref, ref_grads = _train_step_grads(model, ids, mask, dec, labels, seg, dseg)
    with backend("flex"):
        assert model.encoder.use_flex(model.shared(ids))
        out, grads = _train_step_grads(model, ids, mask, dec, labels, seg, dseg)
    keep = labels != -100
    assert (out.float() - ref.float())[keep].abs().max() <= tol * ref.float()[keep].abs().max().clamp(min=1)
    assert grads.keys() == ref_grads.keys()
    assert "encoder.blocks.0.rel_bias.weight" in grads and "decoder.blocks.0.rel_bias.weight" in grads
    for name, g in grads.items():
        scale = ref_grads[name].float().abs().max().clamp(min=1e-6)
        assert ((g.float() - ref_grads[name].float()).abs().max() / scale) <= tol, name


@gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_gpu_auto_inference_uses_flex_and_matches_sdpa(dtype, tol):
    """auto on CUDA: FlexAttention with the table looked up in score_mod (no gradients)."""
    model = tiny(vocab=256).to("cuda", dtype)
    ids, mask = (t.cuda() for t in padded(256, (300, 140, 20)))
    dec = padded(256, (150, 150, 150), seed=1)[0].cuda()
    with torch.no_grad():
        assert model.encoder.use_flex(model.shared(ids))
        with backend("auto"):
            out = model(ids, dec, mask)
        with backend("sdpa"):
            ref = model(ids, dec, mask)
    assert (out.float() - ref.float()).abs().max() <= tol * ref.float().abs().max().clamp(min=1)
