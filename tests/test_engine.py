"""The decode step's twins: eager DecodeCache, the static slot (compiled on CPU, CUDA-graph
replayed on GPU), and packed CPU weights; each against eager, and packed against transformers."""

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
    `drop_at` (the static twin moves to a smaller batch bucket). -> list of (rows, V) logits."""
    with torch.inference_mode():
        eager = engine.start(model, ids, mask, 1, steps, "eager")
        twin = engine.start(model, ids, mask, 1, steps, mode)
        tokens = torch.zeros(len(ids), 1, dtype=torch.long)
        out = []
        for t in range(steps):
            want, got = eager(tokens), twin(tokens)
            out.append((want.clone(), got.clone()))
            tokens = want.argmax(-1, keepdim=True)
            if t == drop_at:
                keep = torch.tensor([1, 3, 4])
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
    if t5kit.inference.cpu.can_pack(torch.float32):
        with pytest.raises(ValueError, match="'compile' takes the model's own weights"):
            pack_linears(model).generate(ids, decode_mode="compile")


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
