"""Bad config values from the reliability survey: each one line naming the key, before any work."""

import pytest
from conftest import tiny_config

from essence.cli import main
from essence.errors import EssenceError
from essence.train.run import train

TINY = "configs/tiny.yaml"
BAD = ["train.batch_size=0", "train.grad_accum=0", "train.lr=-1", "train.lr=.nan",
       "loss.temperature=0", "loss.chunk_size=0", "train.cpu_threads=0", "loss.params.alpha=0.5",
       "train.epochs=0", "train.epochs=-1", "train.max_steps=0", "loss.kd_ratio=1.5",
       "loss.kd_ratio=-0.5", "train.warmup_ratio=5"]


@pytest.mark.parametrize("override", BAD)
def test_a_bad_value_is_one_line_naming_the_key(override, tmp_path, capsys):
    code = main(["train", TINY, override, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    key = override.split("=")[0]
    key = key.rsplit(".", 1)[0] if "params" in key else key  # loss.params={'alpha': 0.5}
    assert code == 2 and err.count("\n") == 1 and key in err, err
    assert not (tmp_path / "run").exists()


def test_resume_with_another_batch_size_and_lsp_is_refused(
        tokenizer_dir, data_file, tmp_path):  # noqa: F811 (the imported fixtures)
    base = ["train.max_steps=2", "train.save_every=1"]
    train(tiny_config(tokenizer_dir, data_file, *base), tmp_path / "run")
    before = (tmp_path / "run" / "summary.json").read_bytes()
    changed = tiny_config(tokenizer_dir, data_file, *base, "train.batch_size=3",
                          "data.truncation.lsp=0.5")
    with pytest.raises(EssenceError, match=r"batch_size.*lsp|lsp.*batch_size") as info:
        train(changed, tmp_path / "run", resume=True)
    assert "\n" not in str(info.value)
    assert (tmp_path / "run" / "summary.json").read_bytes() == before
