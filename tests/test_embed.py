"""`t5kit embed` end to end (in process, real files): its output equals calling the encoder on
each line alone, in input order, for both poolings; truncation; bad input named by file and line."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import t5kit
from t5kit.cli import build_parser, main
from t5kit.data.tokenizer import Tokenizer

pytest.importorskip("transformers")

# Unequal lengths in no sorted order, so batching longest first has to restore the input order.
LINES = ["a short one", "a somewhat longer line of text, with punctuation!", "x",
         "héllo wörld — non-ASCII bytes", "medium length line here"]


@pytest.fixture
def lines_file(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("".join(line + "\n" for line in LINES), encoding="utf-8")
    return path


def _alone(folder, lines, max_length=None):
    """What the encoder gives for each line by itself (no padding): a list of (S_i, C)."""
    enc, tok = t5kit.T5Encoder.from_pretrained(folder), Tokenizer.from_pretrained(folder)
    with torch.no_grad():
        out = []
        for line in lines:
            ids = tok.encode(line)
            if max_length and len(ids) > max_length:
                ids = ids[:max_length - 1] + [tok.eos_id]
            out.append(enc(torch.tensor([ids]))[0])
    return out


@pytest.mark.hf
@pytest.mark.parametrize("which", ["encoder-only", "full"])
def test_embed_mean_is_the_mean_over_each_lines_tokens(enc_dir, hf_dir, lines_file, tmp_path, capsys, which):
    folder = enc_dir("byt5") if which == "encoder-only" else hf_dir("byt5")  # ByT5: a tokenizer with no files
    out = tmp_path / "emb.safetensors"
    assert main(["embed", "--model", folder, "--input", str(lines_file), "--output", str(out),
                 "--batch-size", "2"]) == 0
    assert "embed: 100%" in capsys.readouterr().err  # the progress bar
    emb = load_file(out)["embeddings"]  # (N, C)
    expected = torch.stack([h.mean(0) for h in _alone(folder, LINES)])
    assert emb.shape == expected.shape == (len(LINES), 32)
    assert (emb - expected).abs().max().item() <= 1e-4


@pytest.mark.hf
def test_embed_none_writes_hidden_states_and_mask(enc_dir, lines_file, tmp_path):
    folder, out = enc_dir("byt5"), tmp_path / "h.safetensors"
    result = t5kit.embed(t5kit.EmbedConfig(model=folder, input=str(lines_file), output=str(out), pool="none",
                                           batch_size=2), progress=False)
    tensors = load_file(out)
    hidden, mask = tensors["hidden_states"], tensors["attention_mask"]  # (N, S_max, C), (N, S_max)
    alone = _alone(folder, LINES)
    assert hidden.shape == (len(LINES), max(len(h) for h in alone), 32)
    assert mask.sum(1).tolist() == [len(h) for h in alone]
    for i, h in enumerate(alone):
        assert (hidden[i, :len(h)] - h).abs().max().item() <= 1e-4
        assert not hidden[i, len(h):].any()  # padding positions are zero, whatever the batch
    assert result["lines"] == len(LINES) and result["tokens"] == sum(len(h) for h in alone)
    with safe_open(out, "pt") as f:
        assert f.metadata()["pool"] == "none"


@pytest.mark.hf
def test_embed_truncation_counted(enc_dir, tmp_path, capsys):
    folder, src, out = enc_dir("byt5"), tmp_path / "in.txt", tmp_path / "o.safetensors"
    lines = ["short", "a line longer than eight bytes", "exactly"]
    src.write_text("\n".join(lines) + "\n")
    assert main(["embed", "--model", folder, "--input", str(src), "--output", str(out), "--max-length", "8"]) == 0
    assert "truncated 1 of 3 lines to --max-length 8 tokens" in capsys.readouterr().err
    expected = torch.stack([h.mean(0) for h in _alone(folder, lines, max_length=8)])
    assert (load_file(out)["embeddings"] - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("content, message", [
    (b"one\n\nthree\n", "line 2 is empty"),
    (b"one\ntwo\n   \n", "line 3 is empty"),
    (b"one\n\xff\xfe bad\n", "line 2 is not UTF-8 (byte offset 4)"),
    (b"", "no lines to embed"),
])
def test_embed_bad_input_names_file_and_line(hf_dir, tmp_path, capsys, content, message):
    src, out = tmp_path / "in.txt", tmp_path / "o.safetensors"
    src.write_bytes(content)
    assert main(["embed", "--model", hf_dir("byt5"), "--input", str(src), "--output", str(out)]) == 2
    assert f"{src}: {message}" in capsys.readouterr().err
    assert not out.exists()


def test_embed_unknown_pool(hf_dir, lines_file, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    assert main(["embed", "--model", hf_dir("byt5"), "--input", str(lines_file), "--output", str(out),
                 "--pool", "max"]) == 2
    assert "--pool 'max': expected one of mean, none" in capsys.readouterr().err
    assert not out.exists()


def test_embed_help_says_what_the_file_holds():
    sub = next(a for a in build_parser()._actions if a.dest == "cmd").choices["embed"]
    text = " ".join(sub.format_help().split())
    for phrase in ("'embeddings' (N, C)", "'hidden_states' (N, S_max, C)", "'attention_mask' (N, S_max), 1 = token",
                   "--batch-size", "--device", "--dtype", "--max-length"):
        assert phrase in text, phrase
