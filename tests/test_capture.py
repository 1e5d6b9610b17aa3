"""Session and block discovery on tiny scripts and the bundled examples (CPU, a few seconds)."""

import importlib.util
import sys
import time

import pytest
import torch
import torch.nn as nn

from memtune.blocks import find_blocks
from memtune.capture import Session, StopRun
from memtune.errors import InputError, ScriptError

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "scripts" / "tiny_train.py")


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"_ex_{name}", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_find_blocks_gpt():
    gpt = _load_example("gpt")
    blocks = find_blocks(gpt.GPT(3, 32, 4, 16, 64))
    assert [(b.name, b.kind) for b in blocks] == [
        ("tok", "other"), ("pos", "other"), ("blocks.0", "repeated"), ("blocks.1", "repeated"),
        ("blocks.2", "repeated"), ("ln_f", "other"), ("head", "other")]
    assert [b.index for b in blocks] == list(range(7))


def test_find_blocks_convnet_skips_container_runs():
    # stem and layers are both nn.Sequential side by side: not a run, the bottlenecks are.
    conv = _load_example("convnet")
    blocks = find_blocks(conv.ResNet(16, 3, 10))
    assert [b.name for b in blocks if b.kind == "repeated"] == ["layers.0", "layers.1", "layers.2"]
    assert [b.name for b in blocks if b.kind == "other"] == ["stem", "head"]


def test_find_blocks_collects_the_class_across_stages():
    class Unit(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.lin = nn.Linear(w, w)

    m = nn.Module()
    m.stage1 = nn.Sequential(Unit(8), Unit(8))
    m.down = nn.Linear(8, 16)
    m.stage2 = nn.Sequential(Unit(16), Unit(16), Unit(16))
    names = [b.name for b in find_blocks(m) if b.kind == "repeated"]
    assert names == ["stage1.0", "stage1.1", "stage2.0", "stage2.1", "stage2.2"]


def test_find_blocks_pattern_and_bad_pattern():
    gpt = _load_example("gpt")
    model = gpt.GPT(2, 32, 4, 16, 64)
    blocks = find_blocks(model, "blocks.*.mlp")
    assert [b.name for b in blocks if b.kind == "repeated"] == ["blocks.0.mlp", "blocks.1.mlp"]
    # the attention and norms of each block are then pieces of their own
    assert "blocks.0.attn" in [b.name for b in blocks if b.kind == "other"]
    with pytest.raises(InputError, match="matches no module"):
        find_blocks(model, "layers.*")


def test_find_blocks_unwraps_compile():
    gpt = _load_example("gpt")
    model = gpt.GPT(2, 32, 4, 16, 64)
    compiled = torch.compile(model)
    assert [b.name for b in find_blocks(compiled)] == [b.name for b in find_blocks(model)]


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_find_blocks_hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    blocks = find_blocks(LlamaForCausalLM(cfg))
    rep = [b for b in blocks if b.kind == "repeated"]
    assert [b.name for b in rep] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert {type(b.module).__name__ for b in rep} == {"LlamaDecoderLayer"}
    assert [b.name for b in blocks if b.kind == "other"] == ["model.embed_tokens", "model.norm", "lm_head"]


def _run(*argv, **kw):
    s = Session(TINY, argv=list(argv), **kw)
    seen = {}
    s.on_ready.append(lambda s: seen.setdefault("ready", (type(s.model).__name__, s.steps_done, len(s.blocks))))
    s.on_step.append(lambda s, i: seen.setdefault("steps", []).append(i))
    s.run()
    return s, seen


def test_step_durations_leave_out_our_own_callbacks():
    s = Session(TINY, argv=["--steps", "50"], steps=4, warmup=0)
    s.on_step.append(lambda s, i: time.sleep(0.2) if i == 1 else None)  # e.g. the profiler swapping hooks
    s.run()
    raw = [b - a for a, b in zip(s.step_end_times, s.step_end_times[1:], strict=False)]
    got = s.step_durations()
    assert len(got) == 3 and raw[1] > 0.2 > got[1]
    assert got[0] == pytest.approx(raw[0], abs=0.05) and got[1] == pytest.approx(raw[1] - 0.2, abs=0.05)


def test_session_counts_steps_and_stops():
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    init = torch.optim.AdamW.__init__
    s, seen = _run("--steps", "50", steps=3, warmup=2)
    assert s.stopped and s.failure is None
    assert s.steps_done == 5 and seen["steps"] == [0, 1, 2, 3, 4]
    assert seen["ready"] == ("Net", 0, 5)  # before any step; inp, 3 blocks, out
    assert len(s.step_end_times) == 5 and s.step_end_times == sorted(s.step_end_times)
    assert len(s.optimizers) == 1 and isinstance(s.optimizers[0], torch.optim.AdamW)
    # global state restored
    assert sys.argv == saved_argv and sys.path == saved_path
    assert torch.optim.AdamW.__init__ is init
    assert "_memtune_orig_init" not in torch.optim.Optimizer.__dict__


def test_session_no_stop_runs_to_the_end(capsys):
    s, seen = _run("--steps", "4", steps=1, stop=False)
    assert not s.stopped and s.steps_done == 4 and s.failure is None
    assert "done 4" in capsys.readouterr().out


def test_session_stop_is_not_swallowed_by_except_exception(capsys):
    s, _ = _run("--steps", "10", "--catch-all", steps=2)
    assert s.stopped and s.steps_done == 2
    assert "caught" not in capsys.readouterr().out
    assert issubclass(StopRun, BaseException) and not issubclass(StopRun, Exception)


def test_session_grad_scaler_steps_counted():
    # GradScaler enabled on CPU: its first steps may be skipped (inf at scale 65536) and still count.
    s, seen = _run("--steps", "10", "--scaler", steps=3)
    assert s.stopped and s.steps_done == 3 and s.scaler_steps == 3
    assert seen["steps"] == [0, 1, 2]


def test_session_model_built_after_optimizer():
    s, seen = _run("--steps", "5", "--opt-first", steps=2)
    assert s.failure is None and s.steps_done == 2
    assert type(s.model).__name__ == "Net"
    assert [b.name for b in s.blocks if b.kind == "repeated"] == ["blocks.0", "blocks.1", "blocks.2"]


def test_session_gradient_accumulation_counts_optimizer_steps():
    s, _ = _run("--steps", "5", "--accum", "3", steps=2)
    assert s.steps_done == 2


def test_session_script_failure_is_recorded_with_its_traceback():
    s, _ = _run("--fail-at", "2", steps=5)
    assert s.failure is not None and not s.stopped
    assert s.failure.exc_type == "ValueError" and "boom at step 2" in s.failure.message
    assert "tiny_train.py" in s.failure.traceback
    assert "runpy" not in s.failure.traceback and "capture.py" not in s.failure.traceback
    assert s.steps_done == 2


def test_session_argparse_error_is_a_failure():
    s, _ = _run("--no-such-flag")
    assert s.failure is not None and s.failure.exc_type == "SystemExit"


def test_session_argv_passed_untouched(capsys):
    _run("--echo", "a b", "--", "-x=1")
    assert "ARGV ['--echo', 'a b', '--', '-x=1']" in capsys.readouterr().out


def test_session_missing_script_and_module():
    with pytest.raises(ScriptError, match="not found"):
        Session("no/such/train.py").run()
    with pytest.raises(ScriptError, match="not found"):
        Session(module="no_such_pkg_xyz.train").run()
    with pytest.raises(InputError):
        Session()


def test_session_module(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text((ROOT / "tests" / "scripts" / "tiny_train.py").read_text())
    monkeypatch.chdir(tmp_path)
    s = Session(module="mypkg.train", argv=["--steps", "4"], steps=2).run()
    assert s.failure is None and s.steps_done == 2 and type(s.model).__name__ == "Net"
    assert "mypkg.train" not in sys.modules or sys.modules["__main__"].__name__ == "__main__"


def test_before_run_undo_and_on_end_run_on_failure():
    calls = []
    s = Session(TINY, argv=["--fail-at", "0"])
    s.on_before_run.append(lambda s: (lambda: calls.append("undo")))
    s.on_end.append(lambda s: calls.append("end"))
    s.run()
    assert s.failure is not None and calls == ["end", "undo"]


RELAUNCHER = """\
import os, subprocess, sys
# as Lightning's launcher starts rank 1: this script again, its arguments, LOCAL_RANK=1
extra = ["--other"] if "--other-args" in sys.argv else []
env = dict(os.environ, LOCAL_RANK="1")
p = subprocess.Popen([sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:], *extra], env=env,
                     stdout=subprocess.PIPE, text=True)
print("rank 1 said:", p.communicate()[0].strip())
q = subprocess.run([sys.executable, "-c", "print('helper')"], capture_output=True, text=True)
print("helper said:", q.stdout.strip())
"""


def test_script_starting_its_own_ranks_starts_them_through_memtune(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    script = tmp_path / "launcher.py"
    script.write_text(RELAUNCHER)
    me = [sys.executable, "-c", "print('under memtune')"]
    s = Session(str(script), argv=["--steps", "3"], relaunch=me).run()
    assert s.failure is None and len(s.relaunched) == 1
    out = capsys.readouterr().out
    assert "rank 1 said: under memtune" in out and "helper said: helper" in out  # other commands stand
    import subprocess
    assert subprocess.Popen.__name__ == "Popen" and subprocess.Popen.__module__ == "subprocess"  # undone
    with pytest.raises(InputError, match="torchrun --nproc-per-node N -m memtune"):
        Session(str(script), argv=["--other-args"], relaunch=me).run()
