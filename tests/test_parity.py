"""t5kit vs transformers on real HF checkpoints: encoder states and logits (fp32 <= 1e-4),
padded batches longer than relative_attention_max_distance, and the save round trip."""

import pytest
import torch
from conftest import VARIANTS, load_hf, padded_batch

import t5kit

TOL = 1e-4


def _oracle_logits(ref, name, ids, mask, dec):
    out = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_hidden_states=True)
    if name == "umt5-released":
        # transformers 5.23 UMT5 forces tie_word_embeddings=True and so always applies the v1.0
        # d_model**-0.5 rescale, which released (untied) UMT5 checkpoints never had (t5x, HF 4.x).
        # Oracle: its own decoder output through its own lm_head, without that rescale.
        return ref.lm_head(out.decoder_hidden_states[-1]), out
    return out.logits, out


@pytest.mark.hf
@pytest.mark.parametrize("name", list(VARIANTS))
def test_encoder_and_logits_match_transformers(hf_dir, name):
    folder = hf_dir(name)
    ref = load_hf(folder)
    model = t5kit.T5.from_pretrained(folder)
    vocab = model.config.vocab_size
    ids, mask = padded_batch(vocab, lengths=(150, 100, 31))  # 150 > max_distance (128, or 20)
    dec = padded_batch(vocab, lengths=(140, 140, 140), seed=1)[0]
    with torch.no_grad():
        logits_ref, out = _oracle_logits(ref, name, ids, mask, dec)
        enc = model.encode(ids, mask)
        logits = model(ids, dec, mask)
    keep = mask.bool()
    enc_diff = (enc - out.encoder_last_hidden_state)[keep].abs().max().item()
    logit_diff = (logits - logits_ref).abs().max().item()
    print(f"{name}: encoder max abs diff {enc_diff:.2e}, logits max abs diff {logit_diff:.2e}")
    assert enc_diff <= TOL
    assert logit_diff <= TOL


@pytest.mark.hf
@pytest.mark.parametrize("name", ["t5-v1_0", "t5-v1_1", "mt5", "umt5", "byt5", "odd-shape"])
def test_save_round_trip_loads_in_transformers(hf_dir, tmp_path, name):
    model = t5kit.T5.from_pretrained(hf_dir(name))
    model.save_pretrained(tmp_path)
    ref, info = __import__("transformers").AutoModelForSeq2SeqLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask = padded_batch(model.config.vocab_size, lengths=(40, 17))
    dec = padded_batch(model.config.vocab_size, lengths=(30, 30), seed=2)[0]
    with torch.no_grad():
        diff = (model(ids, dec, mask) - ref.eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)
    assert diff.abs().max().item() <= TOL
    again = t5kit.T5.from_pretrained(tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_sharded_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = t5kit.T5(t5kit.get_preset("tiny").replace(vocab_size=256))
    model.init_weights()
    t5kit.model.hf.save_pretrained(model, tmp_path, max_shard_bytes=200_000)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    again = t5kit.T5.from_pretrained(tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    t5kit.model.hf.save_pretrained(model, tmp_path)  # unsharded save over it removes the stale shards
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.hf
def test_pytorch_model_bin_with_embed_copies(hf_dir, tmp_path):
    """Older checkpoints: pytorch_model.bin holding shared plus encoder/decoder.embed_tokens copies."""
    import shutil

    from safetensors.torch import load_file
    folder = hf_dir("t5-v1_1")
    tensors = load_file(f"{folder}/model.safetensors")
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    tensors["decoder.embed_tokens.weight"] = tensors["shared.weight"]
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    shutil.copy(f"{folder}/config.json", tmp_path)
    a, b = t5kit.T5.from_pretrained(folder), t5kit.T5.from_pretrained(tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.hf
def test_hub_id_resolves_offline_from_cache(hf_dir, tmp_path, monkeypatch):
    """The hub-id path is huggingface_hub's: seed its cache layout locally, then load offline."""
    import shutil
    folder = hf_dir("t5-v1_0")
    repo = tmp_path / "hub" / "models--acme--tiny-t5"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(f"{folder}/{f}", snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = t5kit.T5.from_pretrained("acme/tiny-t5")
    ref = t5kit.T5.from_pretrained(folder)
    assert torch.equal(model.shared.weight, ref.shared.weight)
    with pytest.raises(FileNotFoundError, match="acme/missing"):
        t5kit.T5.from_pretrained("acme/missing")


def test_encoder_only_and_packing_isolation():
    """Packed segments must not see each other: each equals its own unpacked run."""
    torch.manual_seed(0)
    model = t5kit.T5(t5kit.get_preset("tiny").replace(vocab_size=128, dropout_rate=0.0)).eval()
    model.init_weights(torch.Generator().manual_seed(0))
    a, b = torch.randint(3, 128, (1, 7)), torch.randint(3, 128, (1, 5))
    da, db = torch.randint(3, 128, (1, 4)), torch.randint(3, 128, (1, 3))
    packed = model(torch.cat([a, b, torch.zeros(1, 2, dtype=torch.long)], 1), torch.cat([da, db], 1),
                   segment_ids=torch.tensor([[1] * 7 + [2] * 5 + [0, 0]]),
                   decoder_segment_ids=torch.tensor([[1] * 4 + [2] * 3]))
    with torch.no_grad():
        assert torch.allclose(packed[:, :4], model(a, da), atol=1e-5)
        assert torch.allclose(packed[:, 4:], model(b, db), atol=1e-5)
