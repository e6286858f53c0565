"""Each bad checkpoint input gets a clear error naming the file, key or value and what was expected."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import t5kit


@pytest.fixture
def ckpt(hf_dir, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(hf_dir("t5-v1_1"), folder)
    return folder


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no/such/dir.*not found"):
        t5kit.T5.from_pretrained(str(tmp_path / "no/such/dir"))


def test_missing_weights(ckpt):
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights found; expected model.safetensors"):
        t5kit.T5.from_pretrained(ckpt)


def test_truncated_safetensors(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: not a valid safetensors file"):
        t5kit.T5.from_pretrained(ckpt)


def test_corrupt_safetensors_header(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        t5kit.T5.from_pretrained(ckpt)


def test_unknown_feed_forward_proj(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["feed_forward_proj"] = "gated-swishy"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: feed_forward_proj='gated-swishy': expected"):
        t5kit.T5.from_pretrained(ckpt)


def _edit_tensors(ckpt, fn):
    path = str(ckpt / "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def test_missing_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("decoder.block.1.layer.2.DenseReluDense.wo.weight"))
    with pytest.raises(ValueError, match="missing 1 tensor.*decoder.block.1.layer.2.DenseReluDense.wo.weight"):
        t5kit.T5.from_pretrained(ckpt)


def test_extra_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.__setitem__("encoder.block.7.layer.0.SelfAttention.q.weight", torch.zeros(32, 32)))
    with pytest.raises(ValueError, match="unexpected tensor 'encoder.block.7.layer.0.SelfAttention.q.weight'"):
        t5kit.T5.from_pretrained(ckpt)


def test_wrong_shape(ckpt):
    _edit_tensors(ckpt, lambda t: t.__setitem__("encoder.block.0.layer.0.SelfAttention.k.weight", torch.zeros(32, 16)))
    with pytest.raises(ValueError, match=r"'encoder.block.0.layer.0.SelfAttention.k.weight' has shape \(32, 16\), expected \(32, 32\)"):
        t5kit.T5.from_pretrained(ckpt)


def test_unknown_dtype(ckpt):
    with pytest.raises(ValueError, match="dtype 'float33' does not exist: expected one of"):
        t5kit.T5.from_pretrained(ckpt, dtype="float33")


def test_missing_shard(ckpt, tmp_path):
    model = t5kit.T5.from_pretrained(ckpt)
    out = tmp_path / "sharded"
    t5kit.model.hf.save_pretrained(model, out, max_shard_bytes=20_000)
    os.remove(out / "model-00002-of-{:05d}.safetensors".format(len(list(out.glob("model-*")))))
    with pytest.raises(FileNotFoundError, match="model-00002-of-.*missing"):
        t5kit.T5.from_pretrained(out)
