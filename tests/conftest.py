"""Shared fixtures: real Hugging Face checkpoints built by `transformers` itself (random init with a
fixed seed, save_pretrained to a temp dir), in both forms the foundation issue names:

- "hf5": as transformers 5.x creates it (tie_word_embeddings true, scale_decoder_outputs recorded);
- "released": as the published v1.1 / Flan / mT5 / UMT5 / ByT5 checkpoints are (a distinct
  lm_head.weight in the safetensors file and "tie_word_embeddings": false in config.json).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

try:
    import transformers  # the parity oracle: tests that need it are marked `hf` and skip without it
except ImportError:
    transformers = None

SMALL = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)

# name -> (transformers config class name, model class name, config overrides, form)
VARIANTS = {
    "t5-v1_0": ("T5Config", "T5ForConditionalGeneration", dict(vocab_size=300), "hf5"),
    "t5-v1_1": ("T5Config", "T5ForConditionalGeneration", dict(vocab_size=300, feed_forward_proj="gated-gelu"), "released"),
    "t5-v1_1-hf5": ("T5Config", "T5ForConditionalGeneration",
                    dict(vocab_size=300, feed_forward_proj="gated-gelu", tie_word_embeddings=False), "hf5"),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", dict(vocab_size=500, feed_forward_proj="gated-gelu"), "released"),
    "umt5": ("UMT5Config", "UMT5ForConditionalGeneration",
             dict(vocab_size=300, feed_forward_proj="gated-gelu", num_decoder_layers=3), "hf5"),
    "umt5-released": ("UMT5Config", "UMT5ForConditionalGeneration",
                      dict(vocab_size=300, feed_forward_proj="gated-gelu"), "released"),
    "byt5": ("T5Config", "T5ForConditionalGeneration",
             dict(vocab_size=384, feed_forward_proj="gated-gelu", num_layers=3, num_decoder_layers=1), "released"),
    "odd-shape": ("T5Config", "T5ForConditionalGeneration",
                  dict(vocab_size=300, d_kv=5, num_heads=3, relative_attention_num_buckets=16,
                       relative_attention_max_distance=20, feed_forward_proj="gated-relu"), "hf5"),
}


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Decisions the library saves between processes (inference/cpu.py's CPU layouts) go to a folder
    of this run's, which pytest cleans up, not the user's ~/.cache: every test, and every process a
    test starts, shares it."""
    before = os.environ.get("T5KIT_CACHE_DIR")
    os.environ["T5KIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("t5kit-cache"))
    yield
    if before is None:
        os.environ.pop("T5KIT_CACHE_DIR")
    else:
        os.environ["T5KIT_CACHE_DIR"] = before


def build_hf_checkpoint(name: str, folder: str, seed: int = 0):
    """Random-init HF model of `name`, saved in its form; returns the folder."""
    cfg_cls, model_cls, overrides, form = VARIANTS[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**{**SMALL, **overrides})
    model = getattr(transformers, model_cls)(cfg).eval()
    model.save_pretrained(folder)
    if form == "released":
        from safetensors.torch import load_file, save_file
        path = os.path.join(folder, "model.safetensors")
        tensors = load_file(path)
        gen = torch.Generator().manual_seed(seed + 1)
        tensors["lm_head.weight"] = torch.randn(tensors["shared.weight"].shape, generator=gen)
        save_file(tensors, path, metadata={"format": "pt"})
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        config["tie_word_embeddings"] = False
        config.pop("scale_decoder_outputs", None)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
    return folder


ENCODER_MODELS = {"T5Config": "T5EncoderModel", "MT5Config": "MT5EncoderModel", "UMT5Config": "UMT5EncoderModel"}


def build_hf_encoder(name: str, folder: str, seed: int = 0):
    """transformers' encoder-only model of `name` (T5EncoderModel, ...), saved as diffusion pipelines
    ship their T5 text encoder: `shared` + `encoder.*`, architectures ["T5EncoderModel"]."""
    cfg_cls, _, overrides, _ = VARIANTS[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**{**SMALL, **overrides})
    getattr(transformers, ENCODER_MODELS[cfg_cls])(cfg).eval().save_pretrained(folder)
    return folder


def _built_once(tmp_path_factory, build, prefix: str):
    """get(name) -> folder of build(name, folder), built on first use and kept for the session."""
    cache = {}

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = build(name, str(tmp_path_factory.mktemp(prefix + name)))
        return cache[name]
    return get


@pytest.fixture(scope="session")
def enc_dir(tmp_path_factory):
    """enc_dir(name) -> folder of that variant's encoder-only checkpoint."""
    return _built_once(tmp_path_factory, build_hf_encoder, "enc-")


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """hf_dir(name) -> folder of that variant's checkpoint."""
    return _built_once(tmp_path_factory, build_hf_checkpoint, "")


def load_hf(folder: str):
    """The oracle: transformers' own from_pretrained of the files."""
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(folder).eval()


def padded_batch(vocab: int, lengths=(150, 100, 31), seed: int = 0):
    """(B, S) ids ending in EOS with unequal lengths, right-padded with 0, and the mask."""
    gen = torch.Generator().manual_seed(seed)
    s = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), s), generator=gen)
    mask = (torch.arange(s)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    ids[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = 1
    return ids, mask


COPY_WORDS = ["cat", "dog", "bird", "fish", "horse", "mouse", "tiger", "lion", "zebra", "snake", "whale", "eagle"]


def copy_batch(gen, n: int):
    """Copy task on ByT5 bytes: 'copy: w1 w2' -> 'w1 w2'. Returns (inputs, targets) text lists."""
    import random
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    targets = [" ".join(rng.choice(COPY_WORDS) for _ in range(rng.randint(1, 3))) for _ in range(n)]
    return ["copy: " + t for t in targets], targets


@pytest.fixture(scope="session")
def copy_model_dir(tmp_path_factory):
    """A tiny ByT5-vocab T5 trained here to copy words, so it emits EOS at varying lengths: beam
    search, stopping and cache bugs show up (random-init models just repeat one token)."""
    import t5kit
    from t5kit.data.tokenizer import Tokenizer
    torch.manual_seed(0)
    tok = Tokenizer.byt5()
    cfg = t5kit.get_preset("tiny").replace(vocab_size=384, dropout_rate=0.0, d_model=64, d_ff=128, num_layers=2,
                                           num_decoder_layers=2)
    model = t5kit.T5(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(500):
        src, tgt = copy_batch(gen, 32)
        ids, mask = tok.encode_batch(src)
        labels, lmask = tok.encode_batch(tgt)
        dec = torch.cat([torch.zeros(len(tgt), 1, dtype=torch.long), labels[:, :-1]], 1)
        logits = model(ids, dec, mask)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.masked_fill(lmask == 0, -100).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("copy")
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "ByT5Tokenizer"}')
    return folder


def eos_model(seed: int = 0):
    """A T5 with weights set by hand so that every output ends in EOS within EOS_WITHIN tokens, whatever
    the CPU's float rounding (a trained toy model's stopping is not: issue 16).

    Everything but the embeddings, the final norms, the decoder's cross-attention and the LM head is
    zero, so each block adds nothing and the decoder's hidden state is 4 e_prev + 2 p: the previous
    token's one-hot embedding, plus (cross-attention with q = 0 averages the source uniformly) p, the
    frequencies of the source tokens 16..63. The LM head turns that into transition logits between
    levels: from the start token to tokens 3-5, from level k (tokens 3 + 3k .. 5 + 3k) to level k + 1
    or EOS, from token 15 to EOS only; every other token is 40 logits down. Seeded random logits on the
    allowed moves, and on the source tokens' pull (2 p), make rows end at different lengths.
    -> (model, ids (6, S), mask (6, S))."""
    import t5kit
    content = list(range(3, 16))
    level = {0: -1, **{t: (t - 3) // 3 for t in content}}
    g = torch.Generator().manual_seed(seed)
    model = t5kit.T5(t5kit.get_preset("tiny").replace(vocab_size=64, num_layers=1, num_decoder_layers=1,
                                                      dropout_rate=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.shared.weight.copy_(4 * torch.eye(64))  # the encoder's output is 8 e_token after its norm
        model.encoder.norm.weight.fill_(1.0)
        model.decoder.norm.weight.fill_(1.0)
        cross = model.decoder.blocks[0].cross
        cross.v.weight[16:, 16:] = torch.eye(48)
        cross.o.weight[16:, 16:] = 0.25 * torch.eye(48)
        moves = torch.full((16, 64), -40.0)  # (previous token, next token) logits
        logits = 1.5 * torch.randn(16, 64, generator=g)
        for prev, lv in level.items():
            nxt = [t for t in content if level[t] == lv + 1] + ([1] if prev else [])
            moves[prev, nxt] = logits[prev, nxt]
        pull = torch.zeros(48, 64)  # (source token, next token)
        pull[:, content + [1]] = 6.0 * torch.randn(48, len(content) + 1, generator=g)
        model.lm_head.weight[:, :16] = moves.T / 8  # the final norm scales the hidden state by about 2
        model.lm_head.weight[:, 16:] = pull.T / 8
    lengths = torch.randint(3, 12, (6,), generator=g)
    s = int(lengths.max()) + 1
    mask = (torch.arange(s)[None] <= lengths[:, None]).long()
    ids = torch.randint(16, 64, (6, s), generator=g) * mask
    ids[torch.arange(6), lengths] = 1
    return model.eval(), ids, mask


EOS_WITHIN = 6  # eos_model: 5 levels of content tokens, then EOS


HF_FIXTURES = {"hf_dir", "enc_dir"}  # checkpoints that transformers builds


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA, tests marked `hf` need transformers; without them they skip,
    saying so. A test that uses a checkpoint transformers builds (HF_FIXTURES, directly or through
    another fixture) is marked `hf` here; a test that calls transformers itself carries the mark.
    Marks added here count for `-m` selection too (`pytest -m "not hf"`): this hook runs before
    pytest's own deselection (pluggy calls hook implementations last registered first, and
    conftest.py registers after pytest's built-in plugins)."""
    missing = {"gpu": None if torch.cuda.is_available() else "needs a CUDA device",
               "hf": None if transformers else "needs transformers (pip install 't5kit[hf]')"}
    for item in items:
        if HF_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.hf)
        for mark, reason in missing.items():
            if reason and mark in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
