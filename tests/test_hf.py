"""GPT-2 interop: Hugging Face's GPT-2 in (init_from=hf:<dir>) and our checkpoints out (export.py),
with logits equal to transformers' on both sides."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hydragpt.errors import UserError
from hydragpt.hf import GPT2_VOCAB, export, load_pretrained
from hydragpt.model import GPT, GPTConfig
from tests.helpers import hf_gpt2, open_prepared, prepare_dataset, run_script

transformers = pytest.importorskip("transformers")


def test_hugging_face_gpt2_loads_with_equal_logits(tmp_path: Path) -> None:
    reference = hf_gpt2(tmp_path / "hf")
    pretrained = load_pretrained(f"hf:{tmp_path / 'hf'}")
    config = GPTConfig(**pretrained["model_config"])
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size) == (3, 4, 48, 64)
    assert config.activation == "gelu_tanh" and config.bias and pretrained["tokenizer"]["name"] == "gpt2"
    model = GPT(config).eval()
    model.load_state_dict(pretrained["model"])
    idx = torch.randint(50257, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], reference(idx).logits, rtol=1e-5, atol=1e-5)


def test_export_round_trip_gives_transformers_our_logits(tmp_path: Path) -> None:
    torch.manual_seed(1)
    config = GPTConfig(name="t", n_layer=2, n_head=2, n_embd=32, block_size=40, vocab_size=70, bias=True)
    model = GPT(config).eval()
    ckpt = {"model": model.state_dict(), "model_config": asdict(config), "tokenizer": {"kind": "char", "chars": "x"}}
    export(ckpt, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "config.json").is_file()
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(70, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, model(idx)[0], rtol=1e-5, atol=1e-5)


def test_export_script_and_its_refusal(trained_run: Path, tmp_path: Path) -> None:
    """The debug model has no biases, which GPT-2 cannot express: one clear error, nothing written."""
    result = run_script("export", f"ckpt={trained_run}", f"out={tmp_path / 'out'}")
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    assert result.stderr.strip().splitlines()[-1].startswith("error: GPT-2 has biases in every linear")


def test_sample_and_eval_from_a_pretrained_directory(tmp_path: Path, gpt2_bpe: None) -> None:
    hf_gpt2(tmp_path / "hf")
    sampled = run_script(
        "sample", f"init_from=hf:{tmp_path / 'hf'}", "start=Hello", "max_new_tokens=5", "num_samples=1", "seed=3"
    )
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("Hello") and sampled.stdout.count("---------------") == 1
    missing = run_script("sample", f"init_from=hf:{tmp_path / 'nothing'}")
    assert missing.returncode == 2 and "is not a Hugging Face model directory" in missing.stderr
    no_data = run_script("eval", f"init_from=hf:{tmp_path / 'hf'}", "task=val_loss")
    assert no_data.returncode == 2 and "a pretrained model has no dataset of its own" in no_data.stderr


def test_bits_per_byte_of_a_gpt2_model_from_token_and_byte_counts(
    tmp_path: Path, gpt2_bpe: None, corpus_file: Path
) -> None:
    """eval.py's bpb against one computed here: transformers' summed loss over the predicted tokens, over
    the bytes tiktoken decodes them to."""
    import tiktoken

    reference = hf_gpt2(tmp_path / "hf")
    prepare_dataset(tmp_path / "data", "shakespeare_gpt2", corpus_file)
    result = run_script(
        "eval",
        f"init_from=hf:{tmp_path / 'hf'}",
        "dataset=shakespeare_gpt2",
        f"paths.data_dir={tmp_path / 'data'}",
        "limit=3",
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    val = open_prepared(tmp_path / "data" / "shakespeare_gpt2").splits["val"]
    tokens = torch.from_numpy(np.asarray(val.read(0, 3 * 64 + 1)).astype(np.int64))
    with torch.no_grad():
        nats = sum(
            F.cross_entropy(reference(tokens[None, s : s + 64]).logits[0], tokens[s + 1 : s + 65], reduction="sum")
            for s in range(0, 3 * 64, 64)
        ).item()
    n_bytes = len(tiktoken.get_encoding("gpt2").decode_bytes(tokens[1:].tolist()))
    assert got["n_tokens"] == 3 * 64 and got["n_bytes"] == n_bytes and n_bytes > 3 * 64
    assert got["bpb"] == pytest.approx(nats / n_bytes / math.log(2), rel=1e-5)
    assert got["loss"] == pytest.approx(nats / (3 * 64), rel=1e-5)


def test_gpt2_options_this_model_lacks_are_refused(tmp_path: Path) -> None:
    config = transformers.GPT2Config(vocab_size=100, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    config.tie_word_embeddings = False
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match="tie_word_embeddings=false, vocab_size=100"):
        load_pretrained(f"hf:{tmp_path / 'hf'}")


def test_export_writes_gpt2_tokenizer_files(tmp_path: Path, gpt2_bpe: None) -> None:
    import tiktoken

    config = GPTConfig(name="t", n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257, bias=True)
    ckpt = {
        "model": GPT(config).state_dict(),
        "model_config": asdict(config),
        "tokenizer": {"kind": "tiktoken", "name": "gpt2"},
    }
    export(ckpt, tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "Hello, I'm a language model,  émigré 123\n\nok"
    assert tokenizer.encode(text) == tiktoken.get_encoding("gpt2").encode(text)
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 50256


def test_finetune_recipe_from_a_local_gpt2(gpt2_bpe: None, tmp_path: Path, corpus_file: Path) -> None:
    """experiment=finetune_shakespeare from hf:<dir>: the shape comes from the weights (only dropout may
    change), the run's first evaluation is the pretrained model's, and its checkpoint exports back."""
    hf_gpt2(tmp_path / "hf")
    prepare_dataset(tmp_path / "data", "shakespeare_gpt2", corpus_file)
    run = tmp_path / "run"
    result = run_script(
        "train",
        "experiment=finetune_shakespeare",
        f"train.init_from=hf:{tmp_path / 'hf'}",
        "system=cpu",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={run}",
        "train.max_iters=2",
        "train.grad_accum_steps=2",
        "train.eval_iters=2",
        "train.eval_interval=2",
        "model.dropout=0.1",
    )
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    shape = ckpt["model_config"]
    assert (shape["n_layer"], shape["n_embd"], shape["block_size"], shape["activation"], shape["dropout"]) == (
        3,
        48,
        64,
        "gelu_tanh",
        0.1,
    )
    exported = run_script("export", f"ckpt={run}", f"out={tmp_path / 'back'}")
    assert exported.returncode == 0, exported.stderr
    assert transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").config.n_layer == 3


@pytest.mark.parametrize("tied", [False, True])
def test_llama_export_and_import_keep_our_logits(tmp_path: Path, tied: bool) -> None:
    """A rotary, RMSNorm, SwiGLU, GQA model without biases goes out as transformers' LlamaForCausalLM and
    comes back through init_from=hf:<dir>, with equal logits at 1e-5 on both sides (norm gains random)."""
    torch.manual_seed(2)
    options = {"positions": "rope", "norm": "rmsnorm", "activation": "swiglu", "n_kv_head": 2, "bias": False}
    config = GPTConfig(name="l", n_layer=2, n_head=4, n_embd=64, block_size=48, vocab_size=GPT2_VOCAB,
                       tie_embeddings=tied, rope_base=500.0, **options)  # fmt: skip
    model = GPT(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln_" in name:
                param.normal_(1, 0.2)
    ckpt = {"model": model.state_dict(), "model_config": asdict(config), "tokenizer": {"kind": "char", "chars": "x"}}
    export(ckpt, tmp_path / "out")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(GPT2_VOCAB, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, model(idx)[0], rtol=1e-5, atol=1e-5)
        back = load_pretrained(f"hf:{tmp_path / 'out'}")
        again = GPT(GPTConfig(**back["model_config"])).eval()
        again.load_state_dict(back["model"])
        torch.testing.assert_close(again(idx)[0], model(idx)[0], rtol=1e-5, atol=1e-5)
    assert GPTConfig(**back["model_config"]).n_kv_head == 2 and back["model_config"]["tie_embeddings"] == tied


def test_a_rotary_model_llama_cannot_express_is_refused(tmp_path: Path) -> None:
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=60, positions="rope", bias=False)
    ckpt = {"model": GPT(config).state_dict(), "model_config": asdict(config), "tokenizer": {"kind": "char"}}
    with pytest.raises(UserError, match=r"model\.norm=layernorm, which Llama has no equivalent for"):
        export(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
