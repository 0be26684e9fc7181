from pathlib import Path

import pytest

from essence.config.load import load_config, parse_override, save_config
from essence.errors import EssenceError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.model.student or config.model.student_init


def test_overrides_apply_with_types():
    config = load_config(CONFIGS / "tiny.yaml", ["train.lr=1e-4", "data.truncation.lsp=0.5",
                                                 "data.supervision.kd=[cot,answer]",
                                                 "train.max_steps=3"])
    assert config.train.lr == 1e-4 and config.data.truncation.lsp == 0.5
    assert config.data.supervision.kd == ("cot", "answer") and config.train.max_steps == 3


def test_paper_config_matches_the_paper():
    c = load_config(CONFIGS / "paper-qwen3-8b-to-4b.yaml")
    assert (c.model.teacher, c.model.student) == ("Qwen/Qwen3-8B", "Qwen/Qwen3-4B-Base")
    assert c.data.source == "bespokelabs/Bespoke-Stratos-17k" and c.data.limit == 8000
    assert (c.train.lr, c.train.epochs, c.data.max_length) == (4e-6, 2.0, 4096)
    assert (c.loss.kd_ratio, c.loss.divergence, c.data.truncation.lsp) == (0.5, "forward_kl", 0.5)
    assert c.model.gradient_checkpointing and c.train.mixed_precision == "bf16"
    # The reference code's recipe (issue 10): see the comments in the YAML.
    assert (c.data.system_prompt, c.data.trailing_generation_prompt) == ("drop", True)
    assert (c.data.selection, c.loss.reduction) == ("sample", "sequence")
    assert (c.train.schedule, c.train.warmup_ratio, c.train.betas) == ("one_cycle", 0.1, (0.9, 0.999))
    assert (c.train.weight_decay, c.train.weight_decay_scope) == (0.05, "all")
    assert (c.train.batch_size, c.train.grad_accum, c.train.expect_global_batch) == (1, 1, 4)
    assert c.data.supervision.random_drop_mode == "shared" and c.eval.max_new_tokens == 32768


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "unknown config key 'train.lrr'; did you mean train.lr"),
    ("trian.lr=1", "did you mean train"),
    ("data.truncation.lsp=1.5", r"data.truncation.lsp=1.5 is out of range; valid range: \(0, 1\]"),
    ("loss.divergence=kl", "not one of"),
    ("train.batch_size=two", "train.batch_size must be int"),
    ("train.max_steps", "must look like key.path=value"),
])
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(EssenceError, match=message):
        load_config(CONFIGS / "tiny.yaml", [override])


def test_resolved_config_round_trips(tmp_path):
    config = load_config(CONFIGS / "tiny.yaml", ["data.truncation.window=0.5",
                                                 "data.truncation.window_position=middle"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_parse_override_values():
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=x=y") == ("a", "x=y")
