"""Hub and TFDS names from the command line, with no network: `model.path=org/name` and
`data.train=hf:org/name[:split]` through a Hugging Face cache laid out in the test (as
`huggingface-cli download` leaves it), `tfds:NAME[/CONFIG][:split]` through a builder
prepared into tmp, and a `save_to_disk` folder given as a string."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_jax.configs import default, validate
from dpo_jax.data.errors import RejectLog
from dpo_jax.data.sources import parse_spec, read_sources
from dpo_jax.errors import UserError

ROWS = [{"prompt": f"Q{i}:", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(4)]
REVISION = "0123456789abcdef0123456789abcdef01234567"
ROOT = Path(__file__).resolve().parent.parent


def _hub_repo(cache: Path, repo_type: str, repo_id: str) -> Path:
    """An empty snapshot of `repo_id` in the hub cache layout, `refs/main` naming it."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def _offline_hub(monkeypatch, cache: Path) -> None:
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE=cache, for this process (huggingface_hub reads
    both into its constants at import) and its children."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_hub_names_and_saved_folders_from_strings(tmp_path, monkeypatch, tiny_hf_dir):
    import datasets

    cache = tmp_path / "hub"
    _offline_hub(monkeypatch, cache)
    data = _hub_repo(cache, "dataset", "org/prefs")
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    (data / "test.jsonl").write_text(json.dumps(ROWS[3]) + "\n")
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:2]),
            "test": datasets.Dataset.from_list(ROWS[2:]),
        }
    ).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_list(ROWS[1:]).save_to_disk(str(tmp_path / "flat"))

    def rows(spec, **options):
        return [r.data for r in read_sources([spec], RejectLog(), options)]

    # the cache is read whatever the flag (HF_HUB_OFFLINE: never the network)
    assert rows("hf:org/prefs") == ROWS[:3]
    assert rows("hf:org/prefs:test", allow_downloads=True) == ROWS[3:]
    assert rows(f"hf:{tmp_path / 'saved'}:test") == ROWS[2:]
    assert rows(str(tmp_path / "flat")) == ROWS[1:]  # a save_to_disk folder as data.train
    with pytest.raises(UserError, match=r"holds splits \['train', 'test'\].*hf:.*saved:SPLIT"):
        rows(str(tmp_path / "saved"))
    with pytest.raises(UserError, match=r"^data source 'hf:org/other': .* not in the Hugging "
                       r"Face cache; set allow_downloads=True"):  # fmt: skip
        rows("hf:org/other")
    assert parse_spec("hf:gs://b/saved:test")["hf"] == "gs://b/saved"  # a URL's colon
    assert parse_spec("tfds:glue/sst2:train[:10%]", {"tfds_data_dir": "/d"}) == {
        "tfds": "glue/sst2", "split": "train[:10%]", "data_dir": "/d"
    }  # fmt: skip

    # model.path=org/name: the snapshot's directory, for every reader of the config
    model = _hub_repo(cache, "model", "org/tiny")
    for f in tiny_hf_dir("llama").iterdir():
        (model / f.name).symlink_to(f)  # the hub cache links snapshot files to its blobs
    config = default.get_config()
    config.model.path, config.data.train = "org/tiny", "hf:org/prefs"
    config.run_dir = str(tmp_path / "run")
    validate.check_paths(config)
    assert config.model.path == str(model) and config.data.train == "hf:org/prefs"
    config.model.path = "org/missing"
    with pytest.raises(UserError, match=r"^config key 'model.path': 'org/missing' is no local "
                       r"directory .*--config.allow_downloads=True"):  # fmt: skip
        validate.check_paths(config)


@pytest.mark.heavy  # tensorflow_datasets imports in ~10 s; a builder prepares in a few
def test_tfds_spec_with_a_config_from_a_prepared_builder(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class DpoJaxSpecPrefs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in ("small", "all")]

        def _info(self):
            text = tfds.features.Text()
            feats = tfds.features.FeaturesDict({k: text for k in ("prompt", "chosen", "rejected")})
            return tfds.core.DatasetInfo(builder=self, features=feats)

        def _split_generators(self, dl_manager):
            n = 2 if self.builder_config.name == "small" else len(ROWS)
            gen = self._generate_examples
            return {"train": gen(ROWS[:n]), "test": gen(ROWS[2:])}

        def _generate_examples(self, rows):
            yield from enumerate(rows)

    for name in ("small", "all"):
        builder = DpoJaxSpecPrefs(config=name, data_dir=str(tmp_path), file_format="array_record")
        builder.download_and_prepare()
    options = {"tfds_data_dir": str(tmp_path)}

    def rows(spec):
        got = [r.data for r in read_sources([spec], RejectLog(), options)]
        return sorted(got, key=lambda d: d["prompt"])  # data sources read in hashed order

    assert rows("tfds:dpo_jax_spec_prefs/small") == ROWS[:2]  # split: train
    assert rows("tfds:dpo_jax_spec_prefs/small:test") == ROWS[2:]
    assert rows("tfds:dpo_jax_spec_prefs/all:train") == ROWS
    with pytest.raises(UserError, match="^tfds:nope: no such builder .* data.tfds_data_dir$"):
        rows("tfds:nope")
    # the command line's process has no builder code: the prepared files alone suffice
    code = (
        "import json, sys; from dpo_jax.data.sources import read_sources; "
        "from dpo_jax.data.errors import RejectLog; "
        "print(json.dumps([r.data for r in read_sources([sys.argv[1]], RejectLog(), "
        "{'tfds_data_dir': sys.argv[2]})]))"
    )
    spec = "tfds:dpo_jax_spec_prefs/small:test"
    done = subprocess.run([sys.executable, "-c", code, spec, str(tmp_path)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(got, key=lambda d: d["prompt"]) == ROWS[2:]


@pytest.mark.heavy  # one CLI training run in a child process
def test_cli_trains_from_hub_names_offline(tmp_path, tiny_hf_dir):
    """`dpo-jax train --config.model.path=org/tiny --config.data.train=hf:org/prefs` with
    HF_HUB_OFFLINE=1 and the names only in the local cache."""
    cache = tmp_path / "hub"
    model = _hub_repo(cache, "model", "org/tiny")
    for f in tiny_hf_dir("llama").iterdir():
        (model / f.name).symlink_to(f)
    data = _hub_repo(cache, "dataset", "org/prefs")
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS * 2))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    argv = [
        sys.executable, "-m", "dpo_jax.cli", "train", "--config", "dpo_jax/configs/tiny.py",
        "--config.model.path=org/tiny", "--config.data.train=hf:org/prefs",
        f"--config.run_dir={tmp_path / 'run'}", "--config.num_steps=1",
        "--config.batch_size=2", "--config.grad_accum_steps=1", "--config.data.cache_dir=",
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["path"] == str(model)
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") >= 1
