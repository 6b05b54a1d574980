"""`dpo-jax ref-logps` against PyTorch log-probs on every model family, plus its errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from dpo_jax import cli
from dpo_jax.data import DataError
from tests.hf_fixtures import load_torch_model, make_tiny_hf_model, train_tokenizer

ROWS = [
    {"prompt": "Question: what is two plus two?", "chosen": " Answer: four.", "rejected": " The fox."},
    {"prompt": "Hello world!", "chosen": " How are you today?", "rejected": " I am fine, thank you. Numbers 0 1 2"},
    {"prompt": "User: write a short poem about the sea.\nAssistant:", "chosen": " Waves fold into foam.", "rejected": " No."},
    {"prompt": "The quick brown fox", "chosen": " jumps over the lazy dog.", "rejected": " is a policy.", "id": 7},
    {"prompt": "A chosen answer is", "chosen": " preferred.", "rejected": " rejected by a human rater."},
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _torch_completion_logp(model, tokenizer, prompt: str, completion: str) -> float:
    """TRL's convention: completion ids = tok(prompt + completion)[len(tok(prompt)):] + eos."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    return float(sum(logp[t - 1, full[t]] for t in range(len(prompt_ids), len(full))))


# The CLI path is the same for every family (each family's log-probs equal transformers'
# in tests/test_hf.py): gpt2 and llama (tied and untied heads) in the default tier, gemma2
# (soft-capping, sliding window) and phi3 (fused projections) heavy.
@pytest.mark.parametrize(
    "family",
    ["gpt2", "llama", *(pytest.param(f, marks=pytest.mark.heavy) for f in ("gemma2", "phi3"))],
)
def test_ref_logps_match_torch(family, tokenizer, tmp_path):
    model_dir = make_tiny_hf_model(family, tmp_path / "model", tokenizer=tokenizer)
    src, out = tmp_path / "rows.jsonl", tmp_path / "out" / "ref.jsonl"
    _write_jsonl(src, ROWS)
    # batch size 2 over 5 rows: the last batch is padded, which must not change a number
    # float32 as the torch side (the default is the config's model.dtype, bfloat16)
    rc = cli.main(["ref-logps", "--model", str(model_dir), "--data", str(src),
                   "--output", str(out), "--batch-size", "2", "--dtype", "float32"])  # fmt: skip
    assert rc == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == len(ROWS)
    model = load_torch_model(model_dir)
    for row, got in zip(ROWS, written, strict=True):
        for key in row:  # input fields kept, in input order
            assert got[key] == row[key]
        want_c = _torch_completion_logp(model, tokenizer, row["prompt"], row["chosen"])
        want_r = _torch_completion_logp(model, tokenizer, row["prompt"], row["rejected"])
        np.testing.assert_allclose(got["ref_chosen_logps"], want_c, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(got["ref_rejected_logps"], want_r, rtol=2e-3, atol=2e-3)


@pytest.fixture(scope="module")
def llama_dir(tokenizer, tmp_path_factory):
    return make_tiny_hf_model("llama", tmp_path_factory.mktemp("llama"), tokenizer=tokenizer)


def _run(model, data, out):
    return cli.main(["ref-logps", "--model", str(model), "--data", str(data), "--output", str(out)])


def test_missing_model_dir(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _run(tmp_path / "nope", tmp_path / "d.jsonl", tmp_path / "o.jsonl")


def test_missing_safetensors(llama_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(llama_dir / "config.json", bare / "config.json")
    _write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        _run(bare, tmp_path / "d.jsonl", tmp_path / "o.jsonl")


def test_unknown_architecture(llama_dir, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(llama_dir, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (odd / "config.json").write_text(json.dumps(cfg))
    _write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ValueError, match="mamba"):
        _run(odd, tmp_path / "d.jsonl", tmp_path / "o.jsonl")


def test_row_missing_chosen_names_file_and_line(llama_dir, tmp_path):
    rows = [ROWS[0], {"prompt": "p", "rejected": " r"}]
    _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*chosen"):
        _run(llama_dir, tmp_path / "d.jsonl", tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


def test_non_json_line_names_file_and_line(llama_dir, tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"d\.jsonl:3: malformed JSON"):
        _run(llama_dir, src, tmp_path / "o.jsonl")
