import json
import math
from pathlib import Path

import pytest
import yaml

from essence.cli import main
from essence.config.load import load_config
from essence.errors import EssenceError
from essence.experiments.frontier import (
    FrontierOptions,
    run_frontier,
    truncation_overrides,
)
from essence.experiments.frontier_stats import (
    cheapest,
    compact,
    estimate,
    narrow,
    pareto_flags,
    retention,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "tiny.yaml")
BENCH = REPO / "tests" / "fixtures" / "benchmarks" / "gsm8k_schema.jsonl"
OVERRIDES = [f"eval.benches=[{BENCH}]", "train.progress=false"]
BASE_ACC, PROBLEMS = 0.8, 200


# --- statistics ---------------------------------------------------------------------------

def test_interval_combines_problem_and_seed_noise():
    one = estimate([0.6], 100)
    assert one.sd == 0.0 and one.half_width == pytest.approx(1.96 * math.sqrt(0.6 * 0.4 / 100))
    two = estimate([0.5, 0.7], 100)
    sd = math.sqrt(0.02)  # sample std of 0.5, 0.7
    assert two.mean == pytest.approx(0.6) and two.sd == pytest.approx(sd)
    assert two.half_width == pytest.approx(1.96 * math.sqrt(0.24 / 200 + sd ** 2 / 2))


def test_retention_and_its_half_width():
    point, base = estimate([0.6], 100), estimate([0.8], 400)
    r, h_r = retention(point, base)
    assert r == pytest.approx(0.75)
    assert h_r == pytest.approx(math.sqrt(point.half_width ** 2 + (0.75 * base.half_width) ** 2) / 0.8)


def test_pareto_flags_need_one_strict_improvement():
    # (accuracy, cost): b dominates c (same cost, better); d ties a exactly (neither dominates).
    flags = pareto_flags([(0.8, 1.0), (0.7, 0.5), (0.6, 0.5), (0.8, 1.0), (0.5, 0.9)])
    assert flags == [True, True, False, True, False]


def test_bisection_bracket_and_cheapest():
    assert narrow(0.0, 1.0, 0.5, True) == (0.0, 0.5) and narrow(0.0, 1.0, 0.5, False) == (0.5, 1.0)
    rows = [{"flops_ratio": 0.6, "retention": 0.96, "meets": True},
            {"flops_ratio": 0.4, "retention": 0.97, "meets": True},
            {"flops_ratio": 0.2, "retention": 0.90, "meets": False}]
    assert cheapest(rows, "meets")["flops_ratio"] == 0.4
    assert cheapest(rows, "compatible") is None
    assert [compact(x) for x in (0.5, 0.25, 0.375, 1.0)] == ["0.5", "0.25", "0.375", "1"]


# --- the search, with a stubbed runner --------------------------------------------------

def fraction(config) -> tuple[str, float]:
    t = config.data.truncation
    if t.replay:
        return "replay", t.replay
    if t.cot_lead is not None:
        return "cot_lead", t.cot_lead
    return ("lsp", t.lsp) if t.lsp < 1 else ("baseline", 1.0)


# Known monotone curves: lsp meets 95% for x ≥ 5/6, cot_lead for x ≥ 0.3 (at 0.3 + 0.7x the cost).
CURVES = {"baseline": (lambda x: 1.0, lambda x: 1.0),
          "lsp": (lambda x: 0.7 + 0.3 * x, lambda x: x),
          "cot_lead": (lambda x: 0.92 + 0.1 * x, lambda x: 0.3 + 0.7 * x),
          "replay": (lambda x: 0.5, lambda x: 0.5 + 0.5 * x)}


class Stub:
    """A runner whose accuracy and FLOPs are known functions of the recipe; counts its calls."""

    def __init__(self, curves=CURVES):
        self.calls, self.curves = [], curves

    def __call__(self, config, run_dir):
        family, x = fraction(config)
        self.calls.append((family, x, config.train.seed))
        keep, flops = self.curves[family]
        noise = 0.01 if config.train.seed == 0 else -0.01  # means stay on the curve
        accuracy = BASE_ACC * keep(x) + (noise if family != "baseline" else 0.0)
        return {"steps": 1, "total_flops": 1e12 * flops(x) * 0.75, "teacher_flops_cached": 1e12 * flops(x) * 0.25,
                "eval": {"benchmarks": {"b": {"pass@1": accuracy, "num_problems": PROBLEMS}}}}


def search(out, stub, **options):
    settings = {"families": ("lsp", "cot_lead"), "seeds": (0, 1), "steps": 3, **options}
    return run_frontier(CONFIG, OVERRIDES, out, FrontierOptions(**settings), run_point=stub)


def test_search_bisects_each_family_and_picks_the_cheapest(tmp_path):
    stub = Stub()
    result = search(tmp_path, stub)
    assert result["brackets"] == {"lsp": [0.75, 0.875], "cot_lead": [0.25, 0.375]}
    probed = [(r["family"], r["x"]) for r in result["points"]]
    assert probed == [("lsp", 0.5), ("lsp", 0.75), ("lsp", 0.875),
                      ("cot_lead", 0.5), ("cot_lead", 0.25), ("cot_lead", 0.375)]
    assert len(stub.calls) == 2 + 6 * 2  # the baseline and every probe, once per seed
    winner = result["winner"]
    assert winner["recipe"] == "cot_lead=0.375"
    assert winner["flops_ratio"] == pytest.approx(0.3 + 0.7 * 0.375)  # cached teacher FLOPs count
    assert winner["retention"] == pytest.approx(0.92 + 0.0375)
    by = {r["recipe"]: r for r in result["points"]}
    assert by["lsp=0.875"]["meets"] and not by["lsp=0.75"]["meets"]
    assert by["cot_lead=0.25"]["compatible"] and not by["cot_lead=0.25"]["meets"]
    assert result["compatible"]["recipe"] == "cot_lead=0.25"  # cheaper, within its interval
    assert not by["lsp=0.875"]["pareto"]  # cot_lead=0.5 is cheaper and more accurate
    assert (tmp_path / "points" / "cot_lead-0.375" / "seed-1" / "summary.json").is_file()
    config = load_config(str(tmp_path / "winner.yaml"))
    assert config.data.truncation.cot_lead == 0.375 and config.train.run_group is None
    assert config.model.teacher_cache == str((tmp_path / "teacher-cache").resolve())
    markdown = (tmp_path / "frontier.md").read_text()
    assert "**Winner: cot_lead=0.375**, 95.8% ±" in markdown and "94%" in markdown
    assert "compatible with* the target" in markdown and "- lsp: (0.75, 0.875]" in markdown
    saved = json.loads((tmp_path / "frontier.json").read_text())
    assert saved["winner"]["recipe"] == "cot_lead=0.375" and len(saved["points"]) == 6
    assert (tmp_path / "frontier.png").stat().st_size > 1000
    run = yaml.safe_load((tmp_path / "points" / "lsp-0.5" / "seed-0" / "config.yaml").read_text())
    assert run["train"]["run_group"] == tmp_path.name and run["train"]["seed"] == 0


def test_rerun_reuses_finished_runs_and_more_steps_only_adds_probes(tmp_path):
    first = search(tmp_path, Stub())
    again = Stub()
    assert search(tmp_path, again)["winner"] == first["winner"]
    assert again.calls == []  # nothing retrained
    more = Stub()
    result = search(tmp_path, more, steps=4)
    assert sorted(more.calls) == [("cot_lead", 0.3125, 0), ("cot_lead", 0.3125, 1),
                                  ("lsp", 0.8125, 0), ("lsp", 0.8125, 1)]
    assert result["brackets"]["lsp"] == [0.8125, 0.875] and result["winner"]["recipe"] == "cot_lead=0.3125"


def test_changed_settings_are_refused(tmp_path):
    search(tmp_path, Stub(), steps=1)
    with pytest.raises(EssenceError, match=r"other settings: target 0.95 → 0.9"):
        search(tmp_path, Stub(), steps=1, target=0.9)
    with pytest.raises(EssenceError, match=r"families \['lsp', 'cot_lead'\] → \['lsp'\]"):
        search(tmp_path, Stub(), steps=1, families=("lsp",))
    with pytest.raises(EssenceError, match=r"base config .*train.lr: 0.003 → 0.001"):
        run_frontier(CONFIG, [*OVERRIDES, "train.lr=1e-3"], tmp_path,
                     FrontierOptions(families=("lsp", "cot_lead"), seeds=(0, 1), steps=1), run_point=Stub())


def test_no_recipe_meeting_the_target_is_said_plainly(tmp_path):
    flat = {**CURVES, "lsp": (lambda x: 0.5, lambda x: x)}
    result = search(tmp_path, Stub(flat), families=("lsp", "replay"), steps=2)
    assert result["winner"] is None and result["best"]["recipe"] == "lsp=0.5"
    assert result["brackets"] == {"lsp": [0.75, 1.0], "replay": [0.75, 1.0]}
    markdown = (tmp_path / "frontier.md").read_text()
    assert "**No recipe met the 95% target**" in markdown and "No winner.yaml" in markdown
    assert not (tmp_path / "winner.yaml").exists()
    assert (tmp_path / "points" / "replay-0.5" / "seed-0" / "summary.json").is_file()


def test_replay_overrides_cut_the_rest_with_the_base():
    overrides = truncation_overrides("replay", 0.25, ("cot_lead", 0.3))
    config = load_config(CONFIG, overrides)
    assert config.data.truncation.cot_lead == 0.3 and config.data.truncation.replay == 0.25


def fake_baseline(folder: Path, summary: dict | None) -> str:
    folder.mkdir(parents=True)
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return str(folder)


def test_given_baseline_runs_are_read_not_trained(tmp_path):
    good = {"total_flops": 1e12, "eval": {"benchmarks": {"b": {"pass@1": 0.8, "num_problems": 200}}}}
    runs = [fake_baseline(tmp_path / "b0", good), fake_baseline(tmp_path / "b1", good)]
    stub = Stub()
    result = search(tmp_path / "f", stub, families=("lsp",), steps=1, baseline=tuple(runs))
    assert all(family != "baseline" for family, _, _ in stub.calls)
    assert result["baseline"]["mean"] == pytest.approx(0.8)
    missing = fake_baseline(tmp_path / "none", None)
    with pytest.raises(EssenceError, match="has no summary.json"):
        search(tmp_path / "g", Stub(), families=("lsp",), steps=1, baseline=(missing,))
    unevaluated = fake_baseline(tmp_path / "noeval", {"total_flops": 1e12})
    with pytest.raises(EssenceError, match="has no eval accuracy"):
        search(tmp_path / "h", Stub(), families=("lsp",), steps=1, baseline=(unevaluated,))


@pytest.mark.parametrize("flags,flag", [
    (["--target", "0"], "--target"), (["--target", "1.5"], "--target"),
    (["--target", "x"], "--target"), (["--families", "lsp,window"], "--families"),
    (["--seeds", "0,a"], "--seeds"), (["--seeds", ","], "--seeds"), (["--steps", "0"], "--steps"),
    (["--replay-base", "window=0.5"], "--replay-base"), (["--teacher", "sometimes"], "--teacher"),
])
def test_bad_flags_are_one_line(flags, flag, tmp_path, capsys):
    assert main(["frontier", CONFIG, *OVERRIDES, "--out", str(tmp_path / "f"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err, err
    assert not (tmp_path / "f").exists()  # refused before anything was written


def test_a_missing_baseline_is_refused_before_out_is_claimed(tmp_path, capsys):
    """A typo in --baseline must not leave a settings file that refuses the corrected command."""
    out = tmp_path / "f"
    assert main(["frontier", CONFIG, *OVERRIDES, "--out", str(out), "--baseline",
                 str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"essence: error: {tmp_path / 'nope'} has no summary.json: pass the folder of a finished run"
    assert not out.exists()


def test_config_without_benchmarks_is_refused(tmp_path):
    with pytest.raises(EssenceError, match="eval.benches"):
        run_frontier(CONFIG, [], tmp_path, FrontierOptions(), run_point=Stub())


def test_end_to_end_on_the_tiny_model_with_one_teacher_cache(tmp_path):
    """Real training, accounting and teacher cache; only the score is faked (a random tiny model
    solves nothing), as a known function of the kept share of each sequence."""
    from dataclasses import replace

    from essence.config.load import save_config
    from essence.experiments.frontier import train_point

    calls = []

    def trained(config, run_dir):
        calls.append(run_dir)
        summary = train_point(replace(config, eval=replace(config.eval, benches=())), run_dir)
        save_config(config, run_dir / "config.yaml")  # the run as the frontier asked for it
        t = config.data.truncation
        summary["eval"] = {"benchmarks": {"b": {"pass@1": 0.5 + 0.3 * t.lsp, "num_problems": 50}}}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    overrides = [*OVERRIDES, "train.epochs=1"]
    options = FrontierOptions(families=("lsp",), steps=1, target=0.8)
    result = run_frontier(CONFIG, overrides, tmp_path, options, run_point=trained)
    point = result["points"][0]
    assert point["recipe"] == "lsp=0.5" and point["meets"]  # 0.65 / 0.8 ≥ 0.8
    assert 0.3 < point["flops_ratio"] < 0.7  # half of each sequence, costed by the real ledger
    summary = json.loads((tmp_path / "points" / "lsp-0.5" / "seed-0" / "summary.json").read_text())
    assert summary["teacher_source"] == "cache" and summary["teacher_flops_cached"] > 0
    assert len(list((tmp_path / "teacher-cache").glob("fp-*"))) == 1  # one cache, both runs
    assert load_config(str(tmp_path / "winner.yaml")).data.truncation.lsp == 0.5
    run_frontier(CONFIG, overrides, tmp_path, options, run_point=trained)
    assert len(calls) == 2  # the re-run trained nothing


def test_an_interrupted_run_is_resumed_from_its_checkpoint(tmp_path, monkeypatch):
    from dataclasses import replace

    from essence.config.load import save_config
    from essence.experiments.frontier import train_point
    from essence.train import loop as train_module

    def trained(config, run_dir):
        summary = train_point(replace(config, eval=replace(config.eval, benches=())), run_dir)
        save_config(config, run_dir / "config.yaml")
        summary["eval"] = {"benchmarks": {"b": {"pass@1": 0.8, "num_problems": 50}}}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    original = train_module.Trainer.optimizer_step

    def dying(self, batches):
        if self.config.data.truncation.lsp == 0.5 and self.step == 2:
            raise KeyboardInterrupt  # the machine went away in the middle of the probe
        return original(self, batches)

    overrides = [*OVERRIDES, "train.epochs=1", "train.save_every=1", "train.batch_size=3"]
    options = FrontierOptions(families=("lsp",), steps=1)
    monkeypatch.setattr(train_module.Trainer, "optimizer_step", dying)
    with pytest.raises(KeyboardInterrupt):
        run_frontier(CONFIG, overrides, tmp_path, options, run_point=trained)
    monkeypatch.setattr(train_module.Trainer, "optimizer_step", original)
    run_frontier(CONFIG, overrides, tmp_path, options, run_point=trained)
    metrics = (tmp_path / "points" / "lsp-0.5" / "seed-0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3]  # resumed, nothing twice


def test_teacher_modes(tmp_path):
    search(tmp_path / "online", Stub(), families=("cot_lead",), steps=1, teacher="online")
    run = yaml.safe_load((tmp_path / "online" / "points" / "cot_lead-0.5" / "seed-0" / "config.yaml")
                         .read_text())
    assert run["model"]["teacher_cache"] is None and run["model"]["teacher_context"] == "kept"
    settings = json.loads((tmp_path / "online" / "frontier-settings.json").read_text())
    assert settings["teacher"] == "online"
    with pytest.raises(EssenceError, match="--teacher cache: the config trains without a teacher"):
        run_frontier(CONFIG, [*OVERRIDES, "loss.kd_ratio=0"], tmp_path / "sft",
                     FrontierOptions(teacher="cache"), run_point=Stub())
    result = run_frontier(CONFIG, [*OVERRIDES, "loss.kd_ratio=0"], tmp_path / "sft",
                          FrontierOptions(families=("lsp",), steps=1), run_point=Stub())
    assert result["settings"]["teacher"] == "none"
