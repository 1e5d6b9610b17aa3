"""memtune.tune on hand-built profiles with small fake strategies (fast), and on a real profile."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import memtune
import memtune.strategies as strategies
import memtune.tune as tuning
from memtune.blocks import refs_to_yaml, validate_block_refs
from memtune.errors import BudgetTooSmall, InputError
from memtune.estimate import estimate
from memtune.plan import SectionConfig, check_keys
from memtune.profile import BlockProfile, Hardware, OptimizerProfile, Profile
from memtune.strategies import plan_from_dict
from memtune.strategies.base import SearchOptions, Strategy
from memtune.strategies.layout import available_modes, exception_blocks, propose
from memtune.tune import margin, records, space
from memtune.tune.evaluate import Tuner

MB = 1_000_000


def make_profile(n=8, act=100 * MB, device="cuda", batch=8):
    blocks = [BlockProfile(name="emb", cls="Embedding", kind="other", index=0, param_bytes={"float32": 10 * MB},
                           trainable_param_bytes=10 * MB)]
    for i in range(n):
        blocks.append(BlockProfile(name=f"blocks.{i}", cls="Block", index=i + 1, param_bytes={"float32": 20 * MB},
                                   trainable_param_bytes=20 * MB, activation_bytes=act, input_bytes=10 * MB,
                                   transient_bytes=30 * MB, bwd_transient_bytes=30 * MB, fwd_s=0.01, bwd_s=0.02))
    blocks.append(BlockProfile(name="head", cls="Linear", kind="other", index=n + 1, param_bytes={"float32": 10 * MB},
                               trainable_param_bytes=10 * MB, activation_bytes=2 * act, input_bytes=10 * MB,
                               fwd_s=0.005, bwd_s=0.01))
    params = 20 * MB + n * 20 * MB
    return Profile(
        script="train.py", argv=["--steps", "3"], device=device,
        hardware=Hardware(device=device, h2d_gbps=20.0, d2h_gbps=20.0, gpu_total_bytes=4 * 10**9 if device == "cuda" else None),
        blocks=blocks, optimizers=[OptimizerProfile(cls="torch.optim.adamw.AdamW", kind="adamw", param_bytes=params,
                                                    state_bytes=2 * params, step_s=0.005)],
        param_bytes=params, trainable_param_bytes=params, grad_bytes=params, optimizer_state_bytes=2 * params,
        other_activation_bytes=40 * MB, loss_transient_bytes=50 * MB, step_start_bytes=3 * params,
        batch_size=batch, optimizer_s=0.005, step_s=n * 0.03 + 0.02,
    )


@dataclass(frozen=True)
class FakeCheckpointConfig(SectionConfig):
    blocks: tuple | str = ()

    def to_dict(self):
        return {"blocks": refs_to_yaml(self.blocks)}


class FakeCheckpoint(Strategy):
    name, order = "checkpoint", 50

    def validate(self, section):
        check_keys(section, ["blocks"], "checkpoint")
        return FakeCheckpointConfig(validate_block_refs(section["blocks"], "checkpoint.blocks"))

    def block_modes(self, config):
        return {"recompute": config.blocks}

    def space(self, trial, profile, layout, opts):
        blocks = layout.blocks("recompute")
        return {"blocks": blocks} if blocks else None

    def effect(self, profile, config, sim):
        names = profile.resolve_blocks(config.blocks, "checkpoint")
        for b in sim.blocks:
            if b.name in names:
                b.mode, b.kept_bytes, b.bwd_extra_bytes, b.recompute_s = "recompute", b.input_bytes, b.act_bytes, b.fwd_s


@dataclass(frozen=True)
class FakeCompressConfig(SectionConfig):
    blocks: tuple | str = ()

    @property
    def lossy(self):
        return True

    def to_dict(self):
        return {"blocks": refs_to_yaml(self.blocks)}


class FakeCompress(Strategy):
    """Lossy: keeps a quarter of each chosen block's activations."""

    name, order = "compress", 60

    def validate(self, section):
        return FakeCompressConfig(validate_block_refs(section["blocks"], "compress.blocks"))

    def block_modes(self, config):
        return {"compress": config.blocks}

    def space(self, trial, profile, layout, opts):
        blocks = layout.blocks("compress")
        return {"blocks": blocks} if blocks else None

    def effect(self, profile, config, sim):
        names = profile.resolve_blocks(config.blocks, "compress")
        for b in sim.blocks:
            if b.name in names:
                b.mode, b.kept_bytes, b.extra_fwd_s = "compress", b.act_bytes / 4, 0.001


@dataclass(frozen=True)
class FakeOptimizerConfig(SectionConfig):
    name: str = "adamw"
    state_bits: int | None = None

    @property
    def lossy(self):
        return self.state_bits == 8


class FakeOptimizer(Strategy):
    """Lossy 8-bit states (a quarter of fp32 Adam's), lossless otherwise."""

    name, order = "optimizer", 10

    def validate(self, section):
        return FakeOptimizerConfig(**section)

    def space(self, trial, profile, layout, opts):
        choices = [32] if opts.lossless_only else [32, 8]
        bits = trial.suggest_categorical("optimizer.state_bits", choices)
        return {"name": "adamw", "state_bits": 8} if bits == 8 else None

    def effect(self, profile, config, sim):
        if config.state_bits == 8:
            sim.opt_state_bytes /= 4


def install_fakes(monkeypatch):
    reg = {s.name: s() for s in (FakeCheckpoint, FakeCompress, FakeOptimizer)}
    monkeypatch.setattr(strategies, "_REGISTRY", reg)
    monkeypatch.setattr(strategies, "_loaded", True)
    return reg


@pytest.fixture
def fake_strategies(monkeypatch):
    return install_fakes(monkeypatch)


def opts(**kw):
    kw.setdefault("budget_bytes", int(1.0e9))
    kw.setdefault("trials", 40)
    kw.setdefault("timeout_s", None)
    kw.setdefault("margin", 0.03)
    return tuning.TuneOptions(**kw)


# --- the shared per-block helper ---------------------------------------------------------------------


def test_layout_proposal_and_idempotent(fake_strategies):
    p = make_profile(n=8)
    t = space.ProbeTrial({"blocks.compress": 3, "blocks.recompute": 7, "blocks.other.head": "recompute"})
    o = SearchOptions(device="cuda")
    prop = propose(t, p, o)
    # compress takes the first blocks (offload is not registered), recompute the last ones, clipped to what is
    # left; the head is an exception
    assert prop.refs["compress"] == [0, 1, 2] and prop.refs["recompute"] == [3, 4, 5, 6, 7, "head"]
    assert propose(t, p, o).refs == prop.refs  # a second call in one trial gives the same answer
    assert prop.blocks("compress") == [0, 1, 2]
    # lossless: compress is not offered at all
    lo = SearchOptions(device="cuda", lossless_only=True)
    assert "compress" not in available_modes(p, lo)


def test_a_model_without_repeated_blocks_still_gets_choices_for_its_large_blocks(fake_strategies):
    """An LSTM LM or a GAN's Sequential: no repeated blocks, but a module that saves most of the activations
    is still a choice; one that saves under a tenth of them is not."""
    p = make_profile(n=0)
    p.blocks.insert(1, BlockProfile(name="rnn", cls="LSTM", kind="other", index=1, activation_bytes=900 * MB,
                                    input_bytes=MB, fwd_s=0.01, bwd_s=0.02))
    assert exception_blocks(p) == ["rnn", "head"]  # head 200 MB of 1.1 GB: over a tenth; emb saves nothing
    prop = propose(space.ProbeTrial({"blocks.other.rnn": "recompute"}), p, SearchOptions(device="cuda"))
    assert prop.refs["recompute"] == ["rnn"]
    p.blocks[-1].activation_bytes = 50 * MB
    assert exception_blocks(p) == ["rnn"]


def test_recompute_and_compress_in_one_trial_is_valid(fake_strategies):
    """One layout for all block strategies: compression is searched together with recompute."""
    p = make_profile(n=8)
    tuner = Tuner(p, opts())
    e = tuner.probe({"blocks.compress": 3, "blocks.recompute": 4})
    assert e.valid, e.error
    assert set(e.plan.sections) >= {"checkpoint", "compress"}
    assert p.resolve_blocks(e.plan.get("compress").blocks, "c") == ["blocks.0", "blocks.1", "blocks.2"]
    assert p.resolve_blocks(e.plan.get("checkpoint").blocks, "c") == [f"blocks.{i}" for i in range(4, 8)]


def test_no_offload_mode_without_cuda(monkeypatch, fake_strategies):
    class FakeOffload(FakeCheckpoint):
        name = "offload"

    fake_strategies["offload"] = FakeOffload()
    p = make_profile()
    assert "offload" in available_modes(p, SearchOptions(device="cuda"))
    assert "offload" not in available_modes(p, SearchOptions(device="cpu"))


# --- the search ----------------------------------------------------------------------------------------


def test_tune_fits_budget_and_beats_checkpoint_all(fake_strategies):
    p = make_profile()
    base = estimate(p)
    budget = int(base.peak_bytes * 0.8)
    res = tuning.tune(p, opts(budget_bytes=budget))
    est = estimate(p, res.plan)
    assert est.peak_bytes <= budget * 0.97
    assert res.chosen.peak_bytes == pytest.approx(est.peak_bytes)
    # it recomputes only as many blocks as needed, so it is faster than checkpointing everything
    all_ck = estimate(p, Tuner(p, opts()).plan_for({"blocks.recompute": 8}))
    assert est.step_s < all_ck.step_s
    assert res.plan.provenance["profile_digest"] == p.digest()
    assert res.plan.provenance["budget_bytes"] == budget
    assert res.plan.provenance["predicted"]["peak_bytes"] == int(res.chosen.peak_bytes)
    assert res.plan.run["script"] == "train.py"
    assert any(c.key == res.chosen.key for c in res.pareto)


def test_budget_near_the_cards_size_warns_of_the_allocators_slack(fake_strategies):
    from memtune.profile import Peak

    p = make_profile()  # a 4 GB GPU
    p.peak = Peak(allocated_bytes=2 * 10**9, reserved_bytes=int(2.2e9), phase="loss", measured=True)
    near = tuning.tune(p, opts(budget_bytes=int(3.8e9), trials=5))
    assert any("reserved 1.10x" in w and "--budget 3.39 GiB" in w for w in near.warnings), near.warnings
    room = tuning.tune(p, opts(budget_bytes=int(3.5e9), trials=5))  # 3.5 x 1.1 = 3.85 <= 4 GB
    assert not any("reserved" in w for w in room.warnings)


def test_infeasible_budget_says_smallest_peak(fake_strategies):
    p = make_profile()
    with pytest.raises(BudgetTooSmall, match=r"smallest peak .* predicted with \[.*checkpoint"):
        tuning.tune(p, opts(budget_bytes=10 * MB, trials=15))


def test_lossless_only_never_lossy(fake_strategies):
    p = make_profile()
    budget = int(estimate(p).peak_bytes * 0.6)
    res = tuning.tune(p, opts(budget_bytes=budget, lossless_only=True))
    assert res.plan.lossy == [] and res.chosen.lossy == []
    assert all(not c.lossy for c in res.pareto)
    assert "compress" not in res.plan.sections
    # without the flag a lossy plan is allowed (and labelled)
    res2 = tuning.tune(p, opts(budget_bytes=int(estimate(p).peak_bytes * 0.45)))
    assert res2.chosen.lossy and "[LOSSY]" in res2.chosen.describe


def test_same_seed_same_study_and_resume(tmp_path, fake_strategies):
    p = make_profile()
    budget = int(900 * MB)

    def run(name, seed, trials=15):
        o = opts(budget_bytes=budget, trials=trials, seed=seed, storage=f"sqlite:///{tmp_path / 's.db'}", study_name=name)
        res = tuning.tune(p, o)
        import optuna

        study = optuna.load_study(study_name=name, storage=o.storage)
        return res, [(t.params, t.value) for t in study.trials]

    r1, t1 = run("a", 7)
    r2, t2 = run("b", 7)
    assert t1 == t2 and r1.chosen.key == r2.chosen.key
    r3, t3 = run("a", 7, trials=10)  # resumed: continues the same study
    assert len(t3) == len(t1) + 10 and t3[: len(t1)] == t1
    assert r3.n_trials == len(t3)


def test_batch_knob(fake_strategies):
    p = make_profile(batch=8)
    budget = int(estimate(p).peak_bytes * 1.2)
    res = tuning.tune(p, opts(budget_bytes=budget, batch_flag="--batch-size", batch_values=[4, 8, 16, 32]))
    bs = res.plan.run["knobs"]["--batch-size"]
    assert bs in (4, 8, 16, 32) and res.chosen.unit == "samples/s"
    assert estimate(p, res.plan).peak_bytes <= budget
    assert bs >= 8  # more samples per step is faster and fits with recompute


def test_parse_batch_knob_and_margin():
    assert space.parse_batch_knob("--batch-size=16,8") == ("--batch-size", [8, 16])
    with pytest.raises(InputError, match="--batch-knob"):
        space.parse_batch_knob("batch=8")
    assert margin.parse_margin("5%") == pytest.approx(0.05)
    assert margin.parse_margin(None) is None


def test_safety_margin_reads_accuracy_doc(tmp_path):
    doc = tmp_path / "accuracy.md"
    # the largest under-prediction (measured > predicted) sets it, rounded up to the next whole percent;
    # over-predictions (bf16 +16.8%) don't count, and the median line is ignored when tables are there
    doc.write_text("Median absolute peak error: 0.2% over 3 plans\n\n"
                   "| plan | measured peak GiB | predicted GiB | err |\n|---|---|---|---|\n"
                   "| baseline | 35.44 | 35.44 | +0.0% |\n| bf16 params (lossy) | 32.10 | 37.49 | +16.8% |\n"
                   "| ckpt last half + offload quarter | 22.56 | 21.68 | -3.9% |\n"
                   "| update in backward | failed: RuntimeError | 9.31 | |\n")
    frac, source = margin.safety_margin(doc)
    assert frac == pytest.approx(0.04) and "3.9% over 3 plans" in source
    for meas, pred in ((22.56, 21.68), (10.0, 9.9999)):  # every measured plan fits a budget B if P <= B(1-m)
        assert meas <= pred / (1 - frac)
    doc.write_text("| plan | measured | predicted |\n| a | 10.00 | 10.00 |\n| b | 10.00 | 11.00 |\n")
    assert margin.safety_margin(doc)[0] == pytest.approx(0.01)  # no under-prediction: 1%
    doc.write_text("| plan | measured | predicted |\n| a | 10.00 | 5.00 |\n")
    assert margin.safety_margin(doc)[0] == margin.MAX_MARGIN  # clamped
    doc.write_text("| gpt | ... |\n\nMedian absolute peak error: 4.5% over 25 plans (worst 9.1%)\n")
    assert margin.safety_margin(doc) == (pytest.approx(0.045), "median peak error in accuracy.md")
    doc.write_text("Median absolute peak error: 0.6% over 25 measured plans (worst 16.8%)\n")
    assert margin.safety_margin(doc)[0] == 0.03  # no tables: the median line, at least the default
    assert margin.safety_margin(tmp_path / "missing.md") == (0.03, "default")


def test_safety_margin_of_the_repo_doc_covers_its_measurements():
    from pathlib import Path

    doc = Path(memtune.__file__).resolve().parents[1] / "docs" / "accuracy.md"
    pairs = margin.measured_peak_pairs(doc.read_text())
    assert len(pairs) >= 10
    frac, _ = margin.safety_margin(doc)
    assert all(meas <= pred / (1 - frac) for _, meas, pred in pairs) or frac == margin.MAX_MARGIN
    # the margin tune uses at run time is the doc's, kept as a constant (an installed memtune has no docs/)
    assert margin.safety_margin()[0] == frac == margin.PEAK_MARGIN


def test_pareto_front():
    c = lambda n, peak, thr: records.Candidate(n, {}, str(n), "", peak, 1.0, thr, "steps/s", thr, True)
    front = records.pareto_front([c(0, 10, 1.0), c(1, 5, 0.5), c(2, 7, 0.4), c(3, 12, 0.9), c(4, 6, 0.8)])
    assert [x.number for x in front] == [1, 4, 0]


# --- on a real profile of the bundled examples/gpt.py, with the registered strategies -------------------

GPT_ARGS = ["--layers", "2", "--width", "64", "--heads", "2", "--seq-len", "32", "--vocab", "256",
            "--batch-size", "4", "--steps", "4"]


@pytest.fixture(scope="module")
def gpt_profile(tmp_path_factory):
    from conftest import EXAMPLES

    from memtune.profilers.runner import profile_script

    prof = profile_script(str(EXAMPLES / "gpt.py"), argv=GPT_ARGS, steps=3, warmup=1, measure_hardware=False)
    assert prof.repeated_blocks and prof.batch_size == 4
    return prof


def _budget_between_floor_and_baseline(profile) -> int:
    """A budget the baseline misses but lossless checkpointing meets with the safety margin to spare."""

    base = estimate(profile).peak_bytes
    floor = estimate(profile, plan_from_dict({"checkpoint": {"blocks": "all"}})).peak_bytes / 0.97
    assert floor < base
    return int((floor + base) / 2)


def test_real_profile_plan_fits_budget(gpt_profile):

    budget = _budget_between_floor_and_baseline(gpt_profile)
    for lossless in (True, False):
        res = tuning.tune(gpt_profile, opts(budget_bytes=budget, trials=40, lossless_only=lossless))
        plan = plan_from_dict(res.plan.to_dict())  # what `memtune apply` would load
        est = estimate(gpt_profile, plan)
        assert est.peak_bytes <= budget * 0.97 + 1
        assert res.plan.sections, "the baseline does not fit, so the plan must change something"
        if lossless:
            assert plan.lossy == [] and est.lossy == []
            assert all(not c.lossy for c in res.pareto)


def test_real_profile_infeasible_budget(gpt_profile):
    with pytest.raises(BudgetTooSmall) as e:
        tuning.tune(gpt_profile, opts(budget_bytes=100_000, trials=20))
    msg = str(e.value)
    assert "smallest peak" in msg and "predicted with [" in msg and "at least" in msg


def test_real_profile_lossless_only_never_lossy_in_any_trial(gpt_profile, tmp_path):
    import optuna


    storage = f"sqlite:///{tmp_path / 'l.db'}"
    budget = _budget_between_floor_and_baseline(gpt_profile)
    tuning.tune(gpt_profile, opts(budget_bytes=budget, trials=40, lossless_only=True, storage=storage, study_name="l"))
    trials = optuna.load_study(study_name="l", storage=storage).trials
    assert len(trials) == 40
    assert all(t.user_attrs.get("lossy", []) == [] for t in trials)
    assert all("LOSSY" not in t.user_attrs.get("plan", "") for t in trials)


def test_real_profile_same_seed_and_resume(gpt_profile, tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'r.db'}"
    budget = int(estimate(gpt_profile).peak_bytes * 0.9)

    def run(name, trials):
        tuning.tune(gpt_profile, opts(budget_bytes=budget, trials=trials, seed=11, storage=storage, study_name=name))
        return [(t.params, t.value) for t in optuna.load_study(study_name=name, storage=storage).trials]

    a, b = run("a", 20), run("b", 20)
    assert a == b
    a2 = run("a", 15)
    assert len(a2) == 35 and a2[:20] == a


def test_real_strategies_search_recompute_with_compression(gpt_profile):
    """With the registered strategies: a trial that recomputes some blocks and compresses others is proposed,
    valid, and each block gets its mode (the old per-strategy spaces discarded every such trial)."""
    from memtune.strategies.layout import profile_layout

    # objective memory: under a budget with room to spare a lower peak buys nothing, and compression would
    # not be proposed for throughput
    tuner = Tuner(gpt_profile, opts(budget_bytes=10**12, objective="memory"))
    e = tuner.probe({"blocks.compress": 1, "blocks.recompute": 1, "compress.dtype": "int8"})
    assert e.valid, e.error
    layout = profile_layout(e.plan, gpt_profile)
    assert layout.modes == {"blocks.0": "compress", "blocks.1": "recompute"}
    assert "compress" in e.lossy
    est = estimate(gpt_profile, e.plan)
    base = estimate(gpt_profile)
    assert est.peak_bytes < base.peak_bytes
    # and the study reaches such plans on its own
    res = tuning.tune(gpt_profile, opts(budget_bytes=int(base.peak_bytes * 0.98), trials=60))
    import optuna  # noqa: F401  (the study ran in memory; the evaluated plans are in the tuner's records)
    assert res.n_trials >= 60
