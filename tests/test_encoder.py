"""T5Encoder vs transformers' T5EncoderModel: encoder-only checkpoints (as diffusion pipelines ship
their T5 text encoder) and full ones, fp32 parity on padded batches, strict loading, the decoder
of a full checkpoint left unread, and the save round trip."""

import json
import os
import shutil

import pytest
import torch
from conftest import ENCODER_MODELS, VARIANTS, padded_batch

import t5kit
from t5kit.model import hf

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def _oracle(folder: str, name: str):
    """transformers' own encoder-only class for the variant, loading `folder` (full or encoder-only)."""
    return getattr(transformers, ENCODER_MODELS[VARIANTS[name][0]]).from_pretrained(folder).eval()


def _max_diff(enc, ref, vocab: int) -> float:
    ids, mask = padded_batch(vocab, lengths=(150, 100, 31))  # 150 > relative_attention_max_distance
    with torch.no_grad():
        ours = enc(ids, mask)  # (B, S, C)
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert ours.shape == theirs.shape
    return (ours - theirs)[mask.bool()].abs().max().item()


@pytest.mark.hf
@pytest.mark.parametrize("name", ["t5-v1_0", "t5-v1_1", "mt5", "umt5", "byt5", "odd-shape"])
def test_encoder_only_checkpoint_matches_t5encodermodel(enc_dir, name):
    folder = enc_dir(name)
    enc = t5kit.T5Encoder.from_pretrained(folder)
    assert _max_diff(enc, _oracle(folder, name), enc.config.vocab_size) <= TOL


@pytest.mark.hf
@pytest.mark.parametrize("name", ["t5-v1_0", "t5-v1_1", "umt5-released", "byt5"])
def test_full_checkpoint_matches_and_its_decoder_is_never_read(hf_dir, name, monkeypatch):
    read = []
    get = hf._Reader.get
    monkeypatch.setattr(hf._Reader, "get", lambda self, key: read.append(key) or get(self, key))
    enc = t5kit.T5Encoder.from_pretrained(hf_dir(name))
    assert read and not [k for k in read if hf.DECODER_SIDE.match(k)], read
    full = t5kit.T5.from_pretrained(hf_dir(name))
    assert set(enc.state_dict()) == {k for k in full.state_dict() if k.startswith(("shared.", "encoder."))}
    assert _max_diff(enc, _oracle(hf_dir(name), name), enc.config.vocab_size) <= TOL


@pytest.mark.hf
def test_encoder_only_config_without_decoder_fields(enc_dir, tmp_path):
    shutil.copytree(enc_dir("t5-v1_1"), tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("num_decoder_layers", "decoder_start_token_id", "is_encoder_decoder", "use_cache"):
        cfg.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    a, b = t5kit.T5Encoder.from_pretrained(enc_dir("t5-v1_1")), t5kit.T5Encoder.from_pretrained(tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_sharded_full_checkpoint_opens_only_encoder_shards(tmp_path):
    torch.manual_seed(0)
    model = t5kit.T5(t5kit.get_preset("tiny").replace(vocab_size=256)).eval()
    model.init_weights()
    hf.save_pretrained(model, tmp_path, max_shard_bytes=100_000)
    weight_map = json.loads((tmp_path / hf.SAFE_INDEX).read_text())["weight_map"]
    encoder_shards = {s for k, s in weight_map.items() if not hf.DECODER_SIDE.match(k)}
    decoder_only = set(weight_map.values()) - encoder_shards
    assert decoder_only, "the shard size should leave some shards holding decoder tensors only"
    for shard in decoder_only:
        os.remove(tmp_path / shard)
    enc = t5kit.T5Encoder.from_pretrained(tmp_path)
    ids, mask = padded_batch(256, lengths=(20, 9))
    with torch.no_grad():
        assert torch.equal(enc(ids, mask), model.encode(ids, mask))
    with pytest.raises(FileNotFoundError, match="shard listed in"):  # T5 does need the removed shards
        t5kit.T5.from_pretrained(tmp_path)


@pytest.mark.hf
@pytest.mark.parametrize("name", ["t5-v1_0", "mt5", "umt5"])
def test_save_round_trip_through_t5encodermodel(hf_dir, tmp_path, name):
    enc = t5kit.T5Encoder.from_pretrained(hf_dir(name))
    enc.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == [ENCODER_MODELS[VARIANTS[name][0]]] and cfg["is_encoder_decoder"] is False
    cls = getattr(transformers, ENCODER_MODELS[VARIANTS[name][0]])
    ref, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert _max_diff(enc, ref.eval(), enc.config.vocab_size) <= TOL
    again = t5kit.T5Encoder.from_pretrained(tmp_path)
    for (k, a), (_, b) in zip(enc.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.hf
def test_encoder_only_checkpoint_given_to_t5_names_t5encoder(enc_dir):
    folder = enc_dir("t5-v1_0")
    with pytest.raises(ValueError, match=rf"{folder}: an encoder-only checkpoint .*t5kit\.T5Encoder\.from_pretrained"):
        t5kit.T5.from_pretrained(folder)


def _edit_tensors(src: str, dst, edit) -> None:
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst, dirs_exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.hf
def test_loading_stays_strict_about_encoder_keys(enc_dir, hf_dir, tmp_path):
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    _edit_tensors(enc_dir("t5-v1_0"), tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(ValueError, match=rf"missing 1 tensor\(s\): {key}"):
        t5kit.T5Encoder.from_pretrained(tmp_path / "missing")
    _edit_tensors(hf_dir("t5-v1_0"), tmp_path / "extra", lambda t: t.update(pooler=torch.zeros(3)))
    with pytest.raises(ValueError, match="unexpected tensor 'pooler' .*T5Encoder with 2 encoder layers"):
        t5kit.T5Encoder.from_pretrained(tmp_path / "extra")
    _edit_tensors(enc_dir("t5-v1_0"), tmp_path / "shape", lambda t: t.update({key: torch.zeros(32, 63)}))
    with pytest.raises(ValueError, match=rf"{key}' has shape \(32, 63\), expected \(32, 64\)"):
        t5kit.T5Encoder.from_pretrained(tmp_path / "shape")


@pytest.mark.hf
def test_encoder_only_bin_with_the_embedding_under_its_stack_name(enc_dir, tmp_path):
    """Older T5EncoderModel saves: pytorch_model.bin with `encoder.embed_tokens.weight`, alone or
    beside `shared.weight`."""
    from safetensors.torch import load_file
    folder = enc_dir("t5-v1_1")
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    ref = t5kit.T5Encoder.from_pretrained(folder)
    for keep_shared in (True, False):
        table = tensors["shared.weight"] if keep_shared else tensors.pop("shared.weight")
        torch.save({**tensors, "encoder.embed_tokens.weight": table}, tmp_path / "pytorch_model.bin")
        enc = t5kit.T5Encoder.from_pretrained(tmp_path)
        assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), enc.state_dict().values()))
