"""`t5kit generate` and `t5kit tokenizer train` end to end (in process, real files)."""

import json

import pytest

from t5kit.cli import main


def _library(model_dir, prompts, dtype="fp32", quantize=None, **gen) -> list[list[str]]:
    """What the library generates for the prompts: the CLI must print exactly this. (Comparing with
    the library, not with the words the toy model was trained to copy, holds on every CPU.)"""
    import t5kit
    from t5kit.inference.generate import generate_texts
    from t5kit.model.hf import resolve_dtype
    model = t5kit.for_inference(t5kit.T5.from_pretrained(model_dir, dtype=resolve_dtype(dtype)), quantize)
    return [r.outputs for r in generate_texts(model, t5kit.Tokenizer.from_pretrained(model_dir), prompts, **gen)]


def test_generate_prompts_and_json(copy_model_dir, capsys):
    assert main(["generate", "--model", str(copy_model_dir), "copy: cat dog", "copy: lion"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [o[0] for o in _library(copy_model_dir, ["copy: cat dog", "copy: lion"])]
    assert "tok/s" in err
    assert main(["generate", "--model", str(copy_model_dir), "--json", "--num-beams", "3",
                 "--num-return-sequences", "2", "copy: tiger"]) == 0
    row = json.loads(capsys.readouterr().out)
    want = _library(copy_model_dir, ["copy: tiger"], num_beams=3, num_return_sequences=2)[0]
    assert row["line"] == 1 and row["outputs"] == want and len(want) == 2


def test_generate_bf16_and_int8_on_cpu(copy_model_dir, capsys):
    for extra, kw in ((["--dtype", "bf16"], {"dtype": "bf16"}), (["--quantize", "int8"], {"quantize": "int8"})):
        assert main(["generate", "--model", str(copy_model_dir), "copy: cat dog", *extra]) == 0
        assert capsys.readouterr().out.strip() == _library(copy_model_dir, ["copy: cat dog"], **kw)[0][0]


def test_generate_file_with_bad_lines_keeps_good_ones(copy_model_dir, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_bytes(b"copy: cat\n\ncopy: \xff\xfe bad\ncopy: whale eagle\n")
    out = tmp_path / "out.txt"
    rc = main(["generate", "--model", str(copy_model_dir), "--input", str(src), "--output", str(out),
               "--batch-size", "2"])
    err = capsys.readouterr().err
    assert rc == 1
    good = [o[0] for o in _library(copy_model_dir, ["copy: cat", "copy: whale eagle"])]
    assert out.read_text().splitlines() == [good[0], "", "", good[1]] and all(good)
    assert "line 2: empty prompt" in err and "line 3 is not UTF-8 (byte offset 6" in err


def test_generate_truncation(copy_model_dir, capsys):
    long = "copy: " + "cat " * 50
    assert main(["generate", "--model", str(copy_model_dir), "--max-input-tokens", "16", long]) == 0
    assert "truncated to 16" in capsys.readouterr().err
    assert main(["generate", "--model", str(copy_model_dir), "--max-input-tokens", "16", "--no-truncate", long]) == 1
    assert "more than --max-input-tokens 16" in capsys.readouterr().err


@pytest.mark.parametrize("args, match", [
    (["--num-beams", "0"], "num_beams=0"),
    (["--do-sample", "--top-p", "1.5"], "top_p=1.5"),
    (["--do-sample", "--temperature", "0"], "temperature=0.0"),
])
def test_generate_bad_arguments(copy_model_dir, capsys, args, match):
    assert main(["generate", "--model", str(copy_model_dir), "copy: cat", *args]) == 2
    assert match in capsys.readouterr().err


def test_generate_unknown_model(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "hi"]) == 2
    assert "nope: directory not found" in capsys.readouterr().err


def test_tokenizer_train(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"line {i} of the little corpus with words" for i in range(500)))
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "40", "--out", str(tmp_path / "tok")]) == 0
    assert "140 ids" in capsys.readouterr().err
    assert (tmp_path / "tok" / "spiece.model").exists() and (tmp_path / "tok" / "tokenizer.json").exists()
