"""The decode step's twins: eager DecodeCache, the static slot (compiled on CPU, CUDA-graph
replayed on GPU), and packed CPU weights; each against eager, and packed against transformers."""

import gc
import weakref

import pytest
import torch
from conftest import EOS_WITHIN, eos_model, load_hf, padded_batch
from test_generate import _copy_inputs, _hf_generate, _same

import t5kit
from t5kit.inference import engine
from t5kit.inference.beam import beam_search
from t5kit.inference.cpu import pack_linears
from t5kit.inference.generation import GenerationConfig


def _walk(model, ids, mask, mode, steps=12, drop_at=5):
    """Step the decoder with `mode`, feeding the eager greedy tokens, dropping rows 0 and 2 at
    `drop_at` (the static twin moves to a smaller batch bucket). -> list of (rows, V) logits. Every
    tensor on the model's device (ids')."""
    with torch.inference_mode():
        eager = engine.start(model, ids, mask, 1, steps, "eager")
        twin = engine.start(model, ids, mask, 1, steps, mode)
        tokens = torch.zeros(len(ids), 1, dtype=torch.long, device=ids.device)
        out = []
        for t in range(steps):
            want, got = eager(tokens), twin(tokens)
            out.append((want.clone(), got.clone()))
            tokens = want.argmax(-1, keepdim=True)
            if t == drop_at:
                keep = torch.tensor([1, 3, 4], device=ids.device)
                eager.select(keep), twin.select(keep)
                tokens = tokens[keep]
        return out


def test_compiled_static_step_equals_eager(hf_dir):
    model = t5kit.T5.from_pretrained(hf_dir("t5-v1_1"))
    ids, mask = padded_batch(model.config.vocab_size, lengths=(40, 25, 9, 3, 17))
    for want, got in _walk(model, ids, mask, "compile"):
        assert want.shape == got.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for kw in ({}, {"num_beams": 3, "num_return_sequences": 2}):
        assert _same(model.generate(ids, mask, max_new_tokens=16, decode_mode="compile", **kw),
                     model.generate(ids, mask, max_new_tokens=16, decode_mode="eager", **kw)), kw


@pytest.mark.parametrize("model_type", ["t5", "umt5"])  # one relative-bias table, or one per layer
def test_cache_bias_is_per_distance_and_steps_equal_the_uncached_decoder(model_type):
    """The cache holds the self-attention relative bias per distance back, (H, L) a table, not as
    an (L, L) table (0.5 s and 288 MB to start a 3,000-token t5-small request, a stall for every
    row `serve` decodes beside it). Its steps give the uncached decoder's logits past the buckets'
    max_distance (128), rows at different positions included."""
    cfg = t5kit.get_preset("tiny").replace(model_type=model_type)
    model = t5kit.T5(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval()
    ids, mask = padded_batch(cfg.vocab_size, lengths=(9, 4))
    steps = 140
    with torch.inference_mode():
        dec = engine.start(model, ids, mask, 1, 4096, "eager")
        tables = 1 if model_type == "t5" else cfg.num_decoder_layers  # UMT5: a table in every layer
        assert [tuple(b.shape) for b in dec.cache.self_bias] == [(cfg.num_heads, 4096)] * tables
        tokens = torch.zeros(2, 1, dtype=torch.long)
        fed, got = [], []
        for t in range(steps):
            fed.append(tokens[:, 0].clone())
            got.append(dec(tokens))
            tokens = got[-1].argmax(-1, keepdim=True)
            if t == 0:  # row 1 one step behind from here: its next token is written at position 0 again
                dec.cache.pos[1] = 0
        full = model(ids, torch.stack(fed, 1), mask)  # (2, T, V): teacher forcing on the same tokens
    torch.testing.assert_close(torch.stack(got, 1)[0], full[0], atol=1e-4, rtol=0)
    # row 1: its step t > 0 ran at position t - 1 over the tokens fed at steps 1 .. t
    want = model(ids[1:], torch.stack(fed, 1)[1:, 1:], mask[1:])[0]
    torch.testing.assert_close(torch.stack(got, 1)[1, 1:], want, atol=1e-4, rtol=0)


def test_slots_are_reused_and_bucketed(hf_dir):
    model = t5kit.T5.from_pretrained(hf_dir("t5-v1_0"))
    ids, mask = padded_batch(model.config.vocab_size, lengths=(30, 12, 7))
    with torch.inference_mode():
        first = engine.start(model, ids, mask, 1, 20, "compile")
        slot = first.slot
        assert slot.tokens.shape[0] == engine.batch_bucket(3) == 4
        busy = engine.start(model, ids, mask, 1, 20, "compile")
        assert busy.slot is not slot  # `first` still decodes: its buffers are not shared
        first.select(torch.tensor([2]))  # 1 row left: bucket 1
        assert first.slot.tokens.shape[0] == 1 and first.rows == 1
        again = engine.start(model, ids[:, :20], mask[:, :20], 1, 30, "compile")
        assert again.slot is slot  # released; 20 source tokens and 30 steps round up to 64 as before


def _tiny(seed: int = 0, device: str = "cpu") -> t5kit.T5:
    model = t5kit.T5(t5kit.get_preset("tiny").replace(vocab_size=128, dropout_rate=0.0)).eval()
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.to(device)


def _same_as_eager(model, ids, mask, mode):
    for want, got in _walk(model, ids, mask, mode, steps=8, drop_at=3):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_compiled_slots_follow_new_weights():
    """A slot is reused only over the weights it was built over (issue 17): new values loaded,
    changed in place, or written as FSDP2 gathers them (same storage, version counter kept, which
    weights_of cannot see: the slot takes the request's relative bias at each load)."""
    model = _tiny()
    ids, mask = padded_batch(128, lengths=(20, 9, 3, 14, 6))
    _same_as_eager(model, ids, mask, "compile")  # slots of buckets 8 and 4 built
    model.load_state_dict(_tiny(seed=1).state_dict())
    _same_as_eager(model, ids, mask, "compile")
    table = model.decoder.blocks[0].rel_bias.weight
    with torch.no_grad():
        table.mul_(-2.0)
    _same_as_eager(model, ids, mask, "compile")
    before = engine.weights_of(model)
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(table):  # as _fsdp_collectives.py
        table.add_(1.0)
    assert engine.weights_of(model) == before
    _same_as_eager(model, ids, mask, "compile")


def test_packing_after_compiled_decoding_builds_a_new_slot():
    """Packing (cpu.py) replaces the Linear weights a compiled slot read: the next compiled decoding
    builds a new slot, over the packed weights (issue 17: the old slot was reused and inductor
    failed lowering the packed linears)."""
    if not t5kit.inference.cpu.can_pack(torch.float32):
        pytest.skip("this PyTorch build has no oneDNN")
    model = _tiny()
    ids, mask = padded_batch(128, lengths=(12, 5))
    model.generate(ids, mask, max_new_tokens=4, decode_mode="compile")
    (old,) = engine._SLOTS[model]
    packed = pack_linears(model)
    want = packed.generate(ids, mask, max_new_tokens=4, decode_mode="eager")
    assert torch.equal(packed.generate(ids, mask, max_new_tokens=4, decode_mode="compile"), want)
    (new,) = engine._SLOTS[model]  # the old slot, over the weights packing removed, left the list
    assert new is not old


def test_compiled_slots_do_not_share_a_recompile_limit():
    """Each slot compiles a copy of the step with a code object of its own: dynamo counts
    recompilations per code object, and one shared by every slot failed the ninth slot shape or model
    of a process (`recompile_limit`, 8; set to 1 here, so the second shape would fail)."""
    model = _tiny()
    for lengths in ((12,), (12, 5), (30, 12, 7)):  # batch buckets 1, 2 and 4: three slot shapes
        ids, mask = padded_batch(128, lengths=lengths)
        with torch._dynamo.config.patch(recompile_limit=1):
            got = model.generate(ids, mask, max_new_tokens=3, decode_mode="compile")
        assert torch.equal(got, model.generate(ids, mask, max_new_tokens=3, decode_mode="eager"))


@pytest.mark.parametrize("layout, rows", [("onednn_pad4", 1), ("onednn", 2), ("t5kit", 3)])
def test_compiled_step_over_packed_weights_equals_eager(layout, rows):
    """`--decode-mode compile` on packed CPU weights (what `t5kit generate` runs; issue 19): the
    compiled step calls them through cpu.onednn_linear (one row padded to 4 included) or
    cpu.panel_linear, with the eager packed step's logits (1e-5) and ids."""
    if layout not in t5kit.inference.cpu.candidates(torch.float32) or not t5kit.inference.cpu.can_pack(torch.float32):
        pytest.skip("this PyTorch build has no oneDNN, or t5kit's kernel does not build here")
    model = pack_linears(_tiny(), layouts=layout)
    ids, mask = padded_batch(128, lengths=(12, 5, 9)[:rows])
    with torch.inference_mode():
        eager = engine.start(model, ids, mask, 1, 6, "eager")
        twin = engine.start(model, ids, mask, 1, 6, "compile")
        tokens = torch.zeros(rows, 1, dtype=torch.long)
        for _ in range(6):
            want, got = eager(tokens), twin(tokens)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            tokens = want.argmax(-1, keepdim=True)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=8, decode_mode="compile"),
                       model.generate(ids, mask, max_new_tokens=8, decode_mode="eager"))


def test_slots_do_not_keep_their_model_alive():
    """_SLOTS is keyed weakly by the model; its slots must not hold the model (issue 17)."""
    model = _tiny()
    ids, mask = padded_batch(128, lengths=(12, 5))
    model.generate(ids, mask, max_new_tokens=4, decode_mode="compile")
    assert len(engine._SLOTS[model]) == 1
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_beam_search_beside_a_busy_slot_builds_one_slot(monkeypatch):
    """While another decoding holds the bucket, a beam search gets a slot of its own once, and
    keeps it through every beam step's select (issue 17: it built, and compiled, one per step)."""
    built = []

    class CountingSlot(engine.Slot):
        def __init__(self, model, *key):
            built.append(key)
            super().__init__(model, *key)
    monkeypatch.setattr(engine, "Slot", CountingSlot)
    model = _tiny()
    ids, mask = padded_batch(128, lengths=(20, 9))
    cfg = GenerationConfig(max_new_tokens=6, num_beams=2)
    with torch.inference_mode():
        busy = engine.start(model, ids, mask, 2, 6, "compile")
        out = beam_search(model, ids, mask, cfg, "compile")
    assert len(built) == 2 and built[0] == built[1]  # busy's, then the beam search's
    assert busy.slot.owner() is busy
    assert torch.equal(out, beam_search(model, ids, mask, cfg, "eager"))


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_beam_stop_test_every_k_steps_changes_nothing(early_stopping):
    """The GPU beam loop tests for the end every SYNC_EVERY steps; the steps it runs past the end
    must not change any hypothesis. eos_model ends every output within EOS_WITHIN tokens by
    construction, so the late test always has steps to run past, and rows end at different steps."""
    model, ids, mask = eos_model()
    cfg = GenerationConfig(max_new_tokens=40, num_beams=4, num_return_sequences=2, early_stopping=early_stopping)
    every = beam_search(model, ids, mask, cfg, "eager", sync_every=1)
    assert every.shape[1] <= EOS_WITHIN < 40
    assert len({int((row != 0).sum()) for row in every}) > 1
    assert torch.equal(beam_search(model, ids, mask, cfg, "eager", sync_every=16), every)


@pytest.mark.hf
@pytest.mark.parametrize("name", ["t5-v1_0", "t5-v1_1", "umt5-released", "odd-shape"])
def test_packed_weights_keep_transformers_outputs(hf_dir, name):
    if not t5kit.inference.cpu.can_pack(torch.float32):
        pytest.skip("this PyTorch build has no oneDNN")
    folder = hf_dir(name)
    model, ref = t5kit.T5.from_pretrained(folder), load_hf(folder)
    ids, mask = padded_batch(model.config.vocab_size, lengths=(40, 25, 9, 3))
    dec = torch.randint(0, model.config.vocab_size, (4, 7))
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        packed = pack_linears(model)
        assert all(not isinstance(m, torch.nn.Linear) for m in packed.modules())
        torch.testing.assert_close(packed(ids, dec, mask), want, atol=1e-4, rtol=0)
    for kw in ({}, {"num_beams": 3}):
        assert _same(packed.generate(ids, mask, max_new_tokens=16, **kw),
                     _hf_generate(ref, ids, mask, max_new_tokens=16, **kw)), kw


def test_bad_decode_mode(copy_model_dir):
    model = t5kit.T5.from_pretrained(copy_model_dir)
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="decode mode 'fast': expected auto, eager, graph or compile"):
        model.generate(ids, decode_mode="fast")
    with pytest.raises(ValueError, match="'graph' .* needs a CUDA device"):
        model.generate(ids, decode_mode="graph")


@pytest.mark.gpu
def test_cuda_graph_step_equals_eager(hf_dir):
    model = t5kit.T5.from_pretrained(hf_dir("t5-v1_1"), device="cuda")
    ids, mask = (x.cuda() for x in padded_batch(model.config.vocab_size, lengths=(40, 25, 9, 3, 17)))
    for want, got in _walk(model, ids, mask, "graph"):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for kw in ({}, {"num_beams": 3, "num_return_sequences": 2}, {"do_sample": True, "top_k": 20}):
        runs = []
        for mode in ("graph", "eager"):
            gen = torch.Generator("cuda").manual_seed(0)
            runs.append(model.generate(ids, mask, max_new_tokens=16, decode_mode=mode, generator=gen, **kw))
        assert _same(*runs), kw


@pytest.mark.gpu
def test_cuda_graph_bf16_greedy_equals_eager(copy_model_dir):
    model = t5kit.T5.from_pretrained(copy_model_dir, dtype=torch.bfloat16, device="cuda")
    _, _, _, ids, mask = _copy_inputs(8)
    ids, mask = ids.cuda(), mask.cuda()
    assert _same(model.generate(ids, mask, max_new_tokens=24, decode_mode="graph"),
                 model.generate(ids, mask, max_new_tokens=24, decode_mode="eager"))


@pytest.mark.gpu
def test_cuda_graph_slots_follow_moved_weights_and_free_their_model():
    """A graph replays over the addresses it captured (issue 17): after the weights move (the old
    storage kept and filled with NaN, so a stale replay shows), and after new values are loaded,
    the graph twin still equals eager; the model's slots do not keep it alive."""
    model = _tiny(device="cuda")
    ids, mask = (x.cuda() for x in padded_batch(128, lengths=(20, 9, 3, 14, 6)))
    _same_as_eager(model, ids, mask, "graph")
    old = [p.data for p in model.parameters()]
    model.cpu().cuda()
    for t in old:
        t.fill_(float("nan"))
    _same_as_eager(model, ids, mask, "graph")
    model.load_state_dict(_tiny(seed=1).state_dict())
    _same_as_eager(model, ids, mask, "graph")
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
