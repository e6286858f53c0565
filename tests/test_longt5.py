"""LongT5 (issue 20) against transformers' LongT5 on checkpoints it builds itself (small random
configs, fixed seeds): fp32 logits, encoder states, greedy ids and gradients on padded batches
whose length is no multiple of the block, both attention types; the global block ids against
transformers' own function; the chunked SDPA path with biases rebuilt and kept; FlexAttention
(forced on CPU here, CUDA under `gpu`) against the SDPA path; the save round trip."""

import json

import pytest
import torch
from conftest import padded_batch

import t5kit
from t5kit.model import attention, hf, longt5

transformers = pytest.importorskip("transformers")

TOL = 1e-4
LENGTHS = (37, 20, 4, 2)  # no multiple of 6 or 10 (the blocks); 2 < 3 tokens: a row with no global token

# name -> LongT5Config overrides, and whether the lm_head is saved untied (as released checkpoints are)
VARIANTS = {
    # blocks of 6, global blocks of 3 (not a power of two: float32 block ids), 16 buckets to distance 20
    "tglobal": ({"encoder_attention_type": "transient-global", "local_radius": 5, "global_block_size": 3,
                 "relative_attention_num_buckets": 16, "relative_attention_max_distance": 20,
                 "feed_forward_proj": "gated-gelu"}, False),
    "local": ({"encoder_attention_type": "local", "local_radius": 9, "feed_forward_proj": "relu"}, True),
}
SMALL = {"vocab_size": 300, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
         "decoder_start_token_id": 0}


def _config(name: str, **kw):
    return transformers.LongT5Config(**{**SMALL, **VARIANTS[name][0], **kw})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(name, encoder_only=False) -> folder of transformers' own save_pretrained."""
    built = {}

    def get(name: str, encoder_only: bool = False) -> str:
        if (name, encoder_only) not in built:
            folder = tmp_path_factory.mktemp(f"longt5-{name}")
            torch.manual_seed(0)
            cls = transformers.LongT5EncoderModel if encoder_only else transformers.LongT5ForConditionalGeneration
            cls(_config(name)).eval().save_pretrained(folder)
            if VARIANTS[name][1] and not encoder_only:  # a distinct lm_head, "tie_word_embeddings": false
                from safetensors.torch import load_file, save_file
                tensors = load_file(folder / "model.safetensors")
                tensors["lm_head.weight"] = torch.randn(tensors["shared.weight"].shape,
                                                        generator=torch.Generator().manual_seed(1))
                save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
                cfg = json.loads((folder / "config.json").read_text())
                cfg["tie_word_embeddings"] = False
                cfg.pop("scale_decoder_outputs", None)
                (folder / "config.json").write_text(json.dumps(cfg))
            built[name, encoder_only] = str(folder)
        return built[name, encoder_only]
    return get


def _reference(folder: str):
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(folder).eval()


def _batch(vocab: int):
    ids, mask = padded_batch(vocab, lengths=LENGTHS)
    dec = padded_batch(vocab, lengths=(9, 9, 9, 9), seed=1)[0]
    return ids, mask, dec


@pytest.mark.hf
@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_encoder_and_greedy_ids_match_transformers(checkpoint, name):
    model, ref = t5kit.T5.from_pretrained(checkpoint(name)), _reference(checkpoint(name))
    assert model.config.model_type == "longt5" and model.config.encoder_attention_type == VARIANTS[name][0][
        "encoder_attention_type"]
    ids, mask, dec = _batch(model.config.vocab_size)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        assert (model.encode(ids, mask) - out.encoder_last_hidden_state)[mask.bool()].abs().max() <= TOL
        assert (model(ids, dec, mask) - out.logits).abs().max() <= TOL
        theirs = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12)[:, 1:]
        ours = model.generate(ids, mask, max_new_tokens=12)
    theirs = theirs.masked_fill((theirs == 1).long().cumsum(1) - (theirs == 1).long() > 0, 0)
    assert torch.equal(ours, theirs[:, :ours.shape[1]]) and not theirs[:, ours.shape[1]:].any()


@pytest.mark.hf
@pytest.mark.parametrize("name", list(VARIANTS))
def test_encoder_only_checkpoint_matches_longt5encodermodel(checkpoint, name):
    folder = checkpoint(name, encoder_only=True)
    enc, ref = t5kit.T5Encoder.from_pretrained(folder), transformers.LongT5EncoderModel.from_pretrained(folder).eval()
    for lengths in (LENGTHS, (2, 1)):  # (2, 1): fewer tokens than a global block, no global token at all
        ids, mask = padded_batch(enc.config.vocab_size, lengths=lengths)
        with torch.no_grad():
            diff = (enc(ids, mask) - ref(input_ids=ids, attention_mask=mask).last_hidden_state)[mask.bool()]
        assert diff.abs().max() <= TOL, lengths


@pytest.mark.hf
@pytest.mark.parametrize("name, chunked", [("tglobal", False), ("tglobal", True), ("local", True)])
def test_gradients_match_transformers(checkpoint, name, chunked, monkeypatch):
    """Every parameter's gradient of the loss within 1e-4 of its scale. chunked: one query-block pair
    per SDPA call, only the first chunk's bias kept across layers, the others rebuilt in each."""
    model, ref = t5kit.T5.from_pretrained(checkpoint(name)), _reference(checkpoint(name))
    ids, mask, dec = _batch(model.config.vocab_size)
    if chunked:
        h, n = model.config.num_heads, model.config.local_radius + 1
        per_block = ids.shape[0] * h * n * (3 * n + ids.shape[1] // model.config.global_block_size * (name == "tglobal"))
        monkeypatch.setattr(longt5, "CHUNK_SCORES", 2 * per_block)
        monkeypatch.setattr(longt5, "BIAS_CACHE_BYTES", 2 * per_block * 4)
    labels = padded_batch(model.config.vocab_size, lengths=(9, 9, 9, 9), seed=2)[0]
    loss = torch.nn.functional.cross_entropy(model(ids, dec, mask).flatten(0, 1), labels.flatten())
    loss.backward()
    ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels).loss.backward()
    theirs = dict(ref.named_parameters())
    for param_name, p in model.named_parameters():
        want = theirs[hf.t5kit_to_hf(param_name, model.config)].grad
        assert (p.grad - want).abs().max() <= TOL * want.abs().max().clamp(min=1e-6), param_name


@pytest.mark.hf
@pytest.mark.parametrize("size", [3, 5, 16])
def test_global_block_ids_match_transformers(size):
    from transformers.models.longt5.modeling_longt5 import _make_global_fixed_block_ids
    gen = torch.Generator().manual_seed(size)
    mask = (torch.rand(8, 53, generator=gen) < 0.8).long()  # padding anywhere, as transformers allows it
    mask[0], mask[1, 40:], mask[2, :2] = 1, 0, 1
    ids, valid = longt5.global_block_ids(mask.bool(), size)
    want_ids, want_valid = _make_global_fixed_block_ids(mask, size)
    assert torch.equal(ids, want_ids.long()) and torch.equal(valid, want_valid.bool())


@pytest.mark.hf
def test_save_round_trip_loads_in_transformers(checkpoint, tmp_path):
    model = t5kit.T5.from_pretrained(checkpoint("tglobal"))
    model.save_pretrained(tmp_path / "full")
    ref, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "full", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(ref).__name__ == "LongT5ForConditionalGeneration"
    assert ref.config.encoder_attention_type == "transient-global" and ref.config.global_block_size == 3
    ids, mask, dec = _batch(model.config.vocab_size)
    with torch.no_grad():
        assert (model(ids, dec, mask) - ref.eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
                ).abs().max() <= TOL
    enc = t5kit.T5Encoder.from_pretrained(checkpoint("local"))
    enc.save_pretrained(tmp_path / "enc")
    again, info = transformers.LongT5EncoderModel.from_pretrained(tmp_path / "enc", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["architectures"] == ["LongT5EncoderModel"]
    with torch.no_grad():
        diff = (enc(ids, mask) - again.eval()(input_ids=ids, attention_mask=mask).last_hidden_state)[mask.bool()]
    assert diff.abs().max() <= TOL


def test_one_example_per_row():
    """segment_ids with one example a row is the attention mask; packed rows are refused."""
    torch.manual_seed(0)
    cfg = t5kit.get_preset("tiny").replace(model_type="longt5", encoder_attention_type="transient-global",
                                           local_radius=3, global_block_size=2, vocab_size=64, dropout_rate=0.0)
    model = t5kit.T5(cfg).eval()
    model.init_weights()
    ids, mask = padded_batch(64, lengths=(11, 6))
    dec = padded_batch(64, lengths=(5, 5), seed=1)[0]
    with torch.no_grad():
        assert torch.equal(model(ids, dec, mask, segment_ids=mask), model(ids, dec, mask))
        with pytest.raises(ValueError, match="one example per row"):
            model(ids, dec, mask, segment_ids=mask * (1 + (torch.arange(11) >= 5)))


@pytest.mark.hf
@pytest.mark.parametrize("name", ["long-t5-tglobal-base", "long-t5-local-base"])
def test_preset_param_counts_match_transformers(name):
    cfg = t5kit.get_preset(name)
    with torch.device("meta"):
        ref = transformers.LongT5ForConditionalGeneration(transformers.LongT5Config(**cfg.to_hf_json()))
        ours = t5kit.T5(cfg)
    n_ref = sum(p.numel() for p in ref.parameters()) + (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.d_model)
    assert sum(p.numel() for p in ours.parameters()) == cfg.num_params() == n_ref


def _flex_model(device: str, dtype: torch.dtype = torch.float32):
    """A LongT5 whose head size FlexAttention takes (16), blocks of 61 over several 128-blocks."""
    torch.manual_seed(0)
    cfg = t5kit.get_preset("tiny").replace(model_type="longt5", encoder_attention_type="transient-global",
                                           local_radius=60, global_block_size=16, d_kv=16, vocab_size=300,
                                           dropout_rate=0.0)
    model = t5kit.T5(cfg)
    model.init_weights()
    return model.to(device=device, dtype=dtype)


@pytest.mark.slow
def test_flex_matches_sdpa_on_cpu():
    """The FlexAttention path (BlockMask from the block arithmetic, biases in score_mod), forced on
    CPU without gradients (compiled C++ kernel), against the chunked SDPA path."""
    model = _flex_model("cpu").eval()
    ids, mask = padded_batch(300, lengths=(300, 170, 9))
    with torch.no_grad():
        with attention.backend("sdpa"):
            want = model.encode(ids, mask)
        with attention.backend("flex"):
            assert model.encoder.use_flex(want)
            got = model.encode(ids, mask)
    assert (got - want)[mask.bool()].abs().max() <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_gpu_flex_forward_backward_match_sdpa(dtype, tol):
    """CUDA: FlexAttention (auto) against the chunked SDPA path, encoder states and the gradients
    of every parameter (the bias tables' through score_mod's captured vectors)."""
    model = _flex_model("cuda", dtype)
    ids, mask = (t.cuda() for t in padded_batch(300, lengths=(700, 300, 9)))
    grads, outs = [], []
    for mode in ("auto", "sdpa"):
        model.zero_grad()
        with attention.backend(mode):
            assert model.encoder.use_flex(model.shared(ids)) == (mode == "auto")
            out = model.encode(ids, mask)
            (out.float() * mask[..., None]).square().mean().backward()
        outs.append(out[mask.bool()].float())
        grads.append({k: p.grad.float() for k, p in model.named_parameters() if p.grad is not None})
    assert (outs[0] - outs[1]).abs().max() <= tol * outs[1].abs().max()
    assert grads[0].keys() == grads[1].keys()
    for k, g in grads[1].items():
        assert (grads[0][k] - g).abs().max() <= tol * g.abs().max().clamp(min=1e-6), k


def test_bad_longt5_config_names_the_field():
    with pytest.raises(ValueError, match="config.json: encoder_attention_type='global'"):
        t5kit.T5Config.from_hf_json({"model_type": "longt5", "encoder_attention_type": "global"})
    with pytest.raises(ValueError, match="global_block_size=0"):
        t5kit.T5Config.from_hf_json({"model_type": "longt5", "global_block_size": 0})
    assert "local_radius" not in t5kit.get_preset("t5-small").to_hf_json()  # T5 configs stay as they were
