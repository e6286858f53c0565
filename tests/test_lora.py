"""LoRA in PEFT's format, both ways (issue 21): peft loads t5kit's adapters and t5kit loads peft's
(several target sets, non-zero B) with equal greedy outputs; the merged export equals peft's
merge_and_unload; the base checkpoint stays bit for bit; the adapter file holds exactly the targets'
lora_A / lora_B; resume after kill -9, FSDP and recompute give the uninterrupted losses; bad input
names the module at fault."""

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import _torchrun
from test_finetune import _ft_args, _rows, tasks  # noqa: F401  (fixture)
from test_pretrain import kill9_after_checkpoint

import t5kit
from t5kit.cli import main
from t5kit.model.lora import PREFIX

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _hf_targets(folder, leaves) -> dict[str, tuple]:
    """peft's keys for LoRA on `leaves`, from transformers' own module names (peft matches a target
    by the name's last part) -> {key: shape}."""
    hf = transformers.T5ForConditionalGeneration.from_pretrained(folder)
    out = {}
    for name, m in hf.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in leaves:
            out[f"{PREFIX}{name}.lora_A.weight"] = (None, m.in_features)
            out[f"{PREFIX}{name}.lora_B.weight"] = (m.out_features, None)
    return out


def _peft_model(base, adapter):
    hf = transformers.T5ForConditionalGeneration.from_pretrained(base)
    return peft.PeftModel.from_pretrained(hf, adapter).eval()


def _inputs(vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 5, 7])
    ids = torch.randint(3, vocab, (3, 9), generator=gen) * (torch.arange(9)[None] < lengths[:, None])
    ids[torch.arange(3), lengths - 1] = 1
    return ids, (ids != 0).long()


def _assert_same_greedy(ref, ours, vocab: int, new_tokens: int = 8) -> None:
    """peft's model (transformers generate, the adapter unmerged) and t5kit's (merged at load):
    the same greedy tokens, and the same logits along them (fp32, 1e-4)."""
    ids, mask = _inputs(vocab)
    with torch.no_grad():
        want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                            num_beams=1)[:, 1:]  # no start token, as t5kit's
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=new_tokens)
        width = max(want.shape[1], got.shape[1])
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731  (both pad with 0)
        assert torch.equal(pad(want), pad(got)), (want, got)
        dec = torch.cat([torch.zeros(3, 1, dtype=torch.long), want[:, :-1]], 1)
        a = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        b = ours(ids, dec, mask)
    assert (a - b).abs().max() <= 1e-4


# ---- peft -> t5kit ----

PEFT_CASES = {  # name -> (base variant, target_modules, other LoraConfig fields)
    "q,v": ("t5-v1_1", ["q", "v"], {}),
    "all-linear+patterns": ("t5-v1_1", "all-linear", {"rank_pattern": {"wi_0": 2}, "alpha_pattern": {"wo": 3}}),
    "k,o,wi,wo+rslora": ("t5-v1_0", ["k", "o", "wi", "wo"], {"use_rslora": True}),
}


def _train_peft_adapter(base: str, targets, extra: dict, folder) -> str:
    """A peft adapter with non-zero B (init_lora_weights=False: A and B both drawn), saved by peft."""
    torch.manual_seed(1)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_2_SEQ_LM",
                          init_lora_weights=False, **extra)
    peft.get_peft_model(hf, cfg).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_adapter_loads_in_t5kit_with_equal_greedy_outputs(case, hf_dir, tmp_path):
    variant, targets, extra = PEFT_CASES[case]
    base = hf_dir(variant)
    adapter = _train_peft_adapter(base, targets, extra, tmp_path / "adapter")
    ours = t5kit.T5.from_pretrained(base, adapter=adapter)
    plain = t5kit.T5.from_pretrained(base)
    changed = [k for k, v in ours.state_dict().items() if not torch.equal(v, plain.state_dict()[k])]
    leaves = {"q", "v"} if case == "q,v" else {"k", "o", "wi", "wo"} if "rslora" in case else \
        {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    assert changed and {k.rsplit(".", 2)[-2] for k in changed} == leaves  # the targets, and only they
    _assert_same_greedy(_peft_model(base, adapter), ours, ours.config.vocab_size)


def test_merged_export_equals_peft_merge_and_unload(hf_dir, tmp_path, capsys):
    base = hf_dir("t5-v1_1")
    adapter = _train_peft_adapter(base, "all-linear", {"alpha_pattern": {"wo": 3}}, tmp_path / "adapter")
    before = _sha(os.path.join(base, "model.safetensors"))
    out = tmp_path / "merged"
    assert main(["export", "--model", base, "--adapter", adapter, "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["merged"] == 2 * 7 + 2 * 11  # 2 + 2 blocks: 7 / 11 projections each
    want = _peft_model(base, adapter).merge_and_unload().state_dict()
    got = transformers.T5ForConditionalGeneration.from_pretrained(out).state_dict()
    assert set(got) == set(want)
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-5
    assert _sha(os.path.join(base, "model.safetensors")) == before
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # no tmp / old folder left beside
    assert main(["export", "--model", base, "--adapter", adapter, "--out", str(out), "--dtype", "bf16"]) == 0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.load(open(out / "config.json"))["dtype"] == "bfloat16"


# ---- t5kit -> peft ----

def test_t5kit_adapter_loads_in_peft_with_equal_greedy_outputs(tasks, tmp_path, capsys):  # noqa: F811
    base = tasks / "model"
    before = _sha(base / "model.safetensors")
    save = tmp_path / "run"
    assert main(_ft_args(tasks, save, 12, "--lora-rank", "4", "--lora-targets", "q,v,wo", "--lora-dropout", "0.1",
                         "--valid", f"{tasks / 'copy_valid.jsonl'}:copy: ", "--eval-interval", "6",
                         "--save-interval", "0", "--lr", "1e-2")) == 0
    assert _sha(base / "model.safetensors") == before  # the base checkpoint file, bit for bit
    capsys.readouterr()
    for export in ("best", "final"):
        folder = save / export
        files = set(os.listdir(folder))
        assert {"adapter_config.json", "adapter_model.safetensors", "spiece.model"} <= files
        assert not {"model.safetensors", "config.json"} & files
        config = json.load(open(folder / "adapter_config.json"))
        assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 4, 8, 0.1)
        assert config["target_modules"] == ["q", "v", "wo"]
        assert config["base_model_name_or_path"] == str(base)
    tensors = load_file(save / "final" / "adapter_model.safetensors")
    want = _hf_targets(base, {"q", "v", "wo"})
    assert set(tensors) == set(want)  # exactly the targets' lora_A / lora_B
    for key, (out, inp) in want.items():
        assert tensors[key].shape == ((4, inp) if key.endswith("lora_A.weight") else (out, 4))
    assert all(tensors[k].abs().max() > 0 for k in tensors if "lora_B" in k)  # trained away from B = 0
    ours = t5kit.T5.from_pretrained(base, adapter=save / "final")
    _assert_same_greedy(_peft_model(base, save / "final"), ours, ours.config.vocab_size)
    # `t5kit generate --adapter` decodes as the model merged at load
    tok = t5kit.Tokenizer.from_pretrained(base)
    ids, mask = tok.encode_batch(["copy: cat dog"])
    want_text = tok.decode_batch(ours.generate(ids, attention_mask=mask, max_new_tokens=8))[0]
    assert main(["generate", "--model", str(base), "--adapter", str(save / "final"), "--max-new-tokens", "8",
                 "copy: cat dog"]) == 0
    assert capsys.readouterr().out == want_text + "\n"


# ---- resume, FSDP, recompute ----

def _adapter_keys_in_checkpoint(step_dir) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader
    return {k for k in FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata if k.startswith("model.")}


@pytest.mark.slow
def test_kill9_then_resume_matches_uninterrupted(tasks, tmp_path):  # noqa: F811
    """Checkpoints hold the adapters and their optimizer state only; resuming after kill -9 (under
    --recompute-activations, with adapter dropout) gives the uninterrupted run's losses."""
    extra = ("--lora-rank", "4", "--lora-targets", "all-linear", "--lora-dropout", "0.1", "--save-interval", "2")
    full = tmp_path / "full"
    assert main(_ft_args(tasks, full, 6, *extra)) == 0
    ref = {r["step"]: r["loss"] for r in _rows(full)}
    keys = _adapter_keys_in_checkpoint(full / "checkpoints" / "step_00000006")
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), sorted(keys)[:4]
    run = tmp_path / "killed"
    kill9_after_checkpoint(_ft_args(tasks, run, 6, *extra, "--recompute-activations"), run, 2, 6)
    assert main(_ft_args(tasks, run, 6, *extra, "--recompute-activations", "--resume")) == 0
    last = {r["step"]: r["loss"] for r in _rows(run)}
    for step in range(3, 7):
        assert abs(last[step] - ref[step]) <= 1e-6, (step, last[step], ref[step])


@pytest.mark.dist
@pytest.mark.slow
def test_fsdp_checkpoint_resumes_in_one_process_with_the_losses_of_one_process(tasks, tmp_path):  # noqa: F811
    extra = ["--lora-rank", "4", "--global-batch-size", "16", "--micro-batch-size", "8", "--pack",
             "--save-interval", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_ft_args(tasks, one, 6, *extra)) == 0
    res = _torchrun([*_ft_args(tasks, two, 6, *extra, "--exit-interval", "3"), "--parallel", "fsdp",
                     "--recompute-activations"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert main(_ft_args(tasks, two, 6, *extra, "--resume")) == 0
    a, b = _rows(one), _rows(two)
    assert [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    want, got = (load_file(d / "final" / "adapter_model.safetensors") for d in (one, two))
    assert set(got) == set(want) and all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)


# ---- bad input ----

@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "4", "--lora-targets", "q,query"], "--lora-targets: unknown module 'query'"),
    (["--lora-rank", "0"], "--lora-rank 0: expected a rank >= 1"),
    (["--lora-rank", "4", "--lora-targets", "wi"], "--lora-targets: module wi is not in this model"),
])
def test_finetune_bad_lora_flags(flags, message, tasks, tmp_path, capsys):  # noqa: F811
    assert main(_ft_args(tasks, tmp_path / "bad", 2, *flags)) == 2
    assert message in capsys.readouterr().err


def test_adapter_for_other_base_shapes_names_the_module(hf_dir, tmp_path, capsys):
    adapter = _train_peft_adapter(hf_dir("t5-v1_1"), ["q", "v"], {}, tmp_path / "adapter")
    other = hf_dir("odd-shape")  # 3 heads x 5: q is (15, 32), the adapter's (32, 32)
    with pytest.raises(ValueError, match=r"module (en|de)coder\.block\.\d\.layer\.\d\.\w+\.[qv]: the adapter is "
                                         r"for a \(32, 32\) weight, the model's is \(15, 32\)"):
        t5kit.T5.from_pretrained(other, adapter=adapter)
    assert main(["export", "--model", other, "--adapter", adapter, "--out", str(tmp_path / "out")]) == 2
    assert "the adapter is for a (32, 32) weight" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resuming_a_full_finetuning_checkpoint_with_lora_names_the_adapter(tasks, tmp_path, capsys):  # noqa: F811
    save = tmp_path / "run"
    assert main(_ft_args(tasks, save, 2, "--save-interval", "2")) == 0
    assert main(_ft_args(tasks, save, 4, "--save-interval", "2", "--resume", "--lora-rank", "4")) == 2
    assert "the checkpoint has no 'model.encoder.blocks.0.attn.q.lora_A.weight'" in capsys.readouterr().err


def test_longt5_adapter_keys_name_its_encoder_attention_as_peft_does():
    """A LongT5 encoder's self-attention is `TransientGlobalSelfAttention` / `LocalSelfAttention` in
    transformers, so peft's keys for its adapters carry that name (the decoder's stay T5's)."""
    from t5kit.model.lora import peft_key
    for kind, module in (("transient-global", "TransientGlobalSelfAttention"), ("local", "LocalSelfAttention")):
        cfg = t5kit.get_preset("tiny").replace(model_type="longt5", encoder_attention_type=kind)
        assert peft_key("encoder.blocks.1.attn.q.lora_A.weight", cfg) == \
            f"{PREFIX}encoder.block.1.layer.0.{module}.q.lora_A.weight"
        assert peft_key("decoder.blocks.0.attn.v.lora_B.weight", cfg) == \
            f"{PREFIX}decoder.block.0.layer.0.SelfAttention.v.lora_B.weight"
