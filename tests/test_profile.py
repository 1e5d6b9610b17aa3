"""profile_script on tiny scripts and the bundled examples, on CPU."""

import importlib.util
import json

import pytest

from memtune.errors import InputError, ScriptError
from memtune.profile import Profile
from memtune.profilers import ScriptFailed, profile_script

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "scripts" / "tiny_train.py")
GPT = str(ROOT / "examples" / "gpt.py")


def prof(script=TINY, argv=(), **kw):
    kw.setdefault("steps", 3)
    kw.setdefault("warmup", 1)
    return profile_script(script, argv=list(argv), measure_hardware=False, **kw)


def test_mlp_block_activation_bytes_equal_the_count_from_shapes():
    b, w = 4, 16
    p = prof(argv=["--steps", "10", "--batch-size", str(b), "--width", str(w)])
    rep = p.repeated_blocks
    assert [x.name for x in rep] == ["blocks.0", "blocks.1", "blocks.2"]
    # fc saves its input (b, w); gelu saves its input (b, 4w); proj saves gelu's output (b, 4w); fp32;
    # the weights are parameters and are not counted
    expected = 4 * (b * w + b * 4 * w + b * 4 * w)
    for x in rep:
        assert x.activation_bytes == expected
        assert x.activation_bytes_by_dtype == {"float32": expected}
        assert x.input_bytes == 4 * b * w and x.output_bytes == 4 * b * w
        assert x.param_bytes == {"float32": 4 * (w * 4 * w + 4 * w + 4 * w * w + w)}
        assert x.fwd_s > 0 and x.bwd_s > 0
    assert p.batch_size == b and p.seq_len is None
    assert p.steps == 3 and p.warmup == 1
    assert p.step_s > 0 and p.fwd_s > 0 and p.bwd_s > 0 and p.optimizer_s > 0
    opt = p.optimizers[0]
    assert opt.kind == "adamw" and opt.hyperparams["lr"] == pytest.approx(1e-3)
    # AdamW: two fp32 moments per parameter plus one scalar step per tensor
    n_tensors = 2 + 3 * 4 + 2
    assert opt.state_bytes == 2 * p.param_bytes + 4 * n_tensors
    assert p.grad_bytes == p.trainable_param_bytes == p.param_bytes
    # the bf16-weights probe: the same three saved tensors, 2 bytes each; filled for every repeated block
    assert all(x.activation_bytes_bf16_params == expected // 2 for x in rep)
    assert all(x.activation_bytes_bf16_params is None for x in p.blocks if x.kind == "other")
    assert not p.peak.measured and p.peak.allocated_bytes >= p.param_bytes + opt.state_bytes
    assert [x.index for x in p.blocks] == list(range(len(p.blocks)))


def test_gpt_one_block_per_layer_with_equal_activations():
    p = prof(GPT, ["--steps", "10", "--layers", "3", "--width", "32", "--heads", "2", "--seq-len", "16",
                   "--vocab", "64", "--batch-size", "2"])
    rep = p.repeated_blocks
    assert [x.name for x in rep] == ["blocks.0", "blocks.1", "blocks.2"]
    assert len({x.activation_bytes for x in rep}) == 1 and rep[0].activation_bytes > 0
    assert [x.name for x in p.blocks if x.kind == "other"] == ["tok", "pos", "ln_f", "head"]
    assert p.batch_size == 2 and p.seq_len == 16 and p.tokens_per_step == 32
    assert p.other_activation_bytes > 0  # cross-entropy saves its log-softmax
    assert p.model_cls.endswith("GPT") and p.autocast is None
    # bf16-weights probe (CPU: no autocast, so the block runs wholly in bf16; LayerNorm keeps fp32 stats)
    assert len({x.activation_bytes_bf16_params for x in rep}) == 1
    assert rep[0].activation_bytes // 2 <= rep[0].activation_bytes_bf16_params < rep[0].activation_bytes
    assert not any("probe" in n for n in p.notes)
    assert p.extra["clip_grad_norm"] == 1.0  # the script clips: update-in-backward must not be proposed


def test_gradient_accumulation_micro_batches():
    p = prof(GPT, ["--steps", "10", "--layers", "2", "--width", "32", "--heads", "2", "--seq-len", "16",
                   "--vocab", "64", "--batch-size", "2", "--grad-accum", "3"])
    assert p.micro_batches_per_step == 3 and p.tokens_per_step == 2 * 16 * 3
    assert all(b.calls_per_step == 1 for b in p.blocks)  # per micro-batch
    # the CPU peak (no allocator) is the cost model's baseline: the later micro-batches' losses run beside the
    # first one's gradients, which the plain sum of parts left out (tune compared budgets with less)
    from memtune.estimate import estimate

    assert not p.peak.measured and p.peak.allocated_bytes == int(estimate(p).peak_bytes)
    assert p.peak.allocated_bytes >= p.param_bytes + p.optimizer_state_bytes + p.grad_bytes + sum(
        b.activation_bytes for b in p.blocks)


def test_convnet_steps_counted():
    p = prof(str(ROOT / "examples" / "convnet.py"), ["--steps", "10", "--width", "16", "--depth", "2",
                                                     "--image-size", "8"], steps=2, warmup=1)
    assert p.steps == 2 and not p.grad_scaler  # the example's scaler is disabled on CPU
    assert "clip_grad_norm" not in p.extra
    assert [b.cls for b in p.repeated_blocks] == ["Bottleneck", "Bottleneck"]
    assert p.batch_size == 16


def test_grad_scaler_steps_counted():
    p = prof(argv=["--steps", "10", "--scaler"], steps=3)
    assert p.grad_scaler and p.steps == 3


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_hf_llama_decoder_layers():
    p = prof(str(ROOT / "examples" / "hf_llama.py"), ["--steps", "10", "--layers", "2", "--hidden", "32",
                                                      "--intermediate", "64", "--vocab", "100", "--seq-len", "16"],
             steps=1, warmup=1)
    rep = p.repeated_blocks
    assert [b.cls for b in rep] == ["LlamaDecoderLayer", "LlamaDecoderLayer"]
    # equal but for the rotary cos/sin (1, seq, head_dim) fp32 pair that all layers share: the first layer
    # to save it counts it, each storage once
    assert rep[0].activation_bytes - rep[1].activation_bytes == 2 * 16 * (32 // 4) * 4
    assert rep[1].activation_bytes > 0
    # bf16-weights probe, one per class: smaller than the fp32 activations, but not half (RMSNorm computes
    # in fp32 whatever its input is)
    probe = rep[0].activation_bytes_bf16_params
    assert probe is not None and rep[1].activation_bytes_bf16_params == probe
    assert rep[1].activation_bytes // 2 < probe < rep[1].activation_bytes
    assert p.batch_size == 4 and p.seq_len == 16
    assert not p.hf_gradient_checkpointing
    assert any("clean step" in n for n in p.notes)


MASKED = """
import torch, torch.nn as nn
class Block(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.fc = nn.Linear(w, w)
    def forward(self, h, mask):
        return h + torch.relu(self.fc(h)) * mask
class Net(nn.Module):
    def __init__(self, w=16, n=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(w) for _ in range(n))
    def forward(self, x, mask):
        for b in self.blocks:
            x = b(x, mask)
        return x
torch.manual_seed(0)
net = Net()
opt = torch.optim.SGD(net.parameters(), lr=0.1)
mask = torch.ones(8, 16)
for _ in range(10):
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        loss = net(x, mask).float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
"""


def test_inputs_several_blocks_share_and_an_uncached_autocast(tmp_path):
    # the mask goes into every block: a checkpointed block keeps it, but it is live once (zoo T5's position
    # bias, Lightning's causal mask); Lightning's bf16-mixed runs autocast with its cache off
    script = tmp_path / "masked.py"
    script.write_text(MASKED)
    p = prof(str(script), steps=2, warmup=1)
    rep = p.repeated_blocks
    mask = 8 * 16 * 4
    assert [b.shared_input_bytes for b in rep] == [0, mask, mask]
    assert [b.input_bytes for b in rep] == [8 * 16 * 4 + mask] * 3
    assert p.autocast == "bfloat16" and p.autocast_cache is False
    assert prof(steps=2, warmup=1).autocast_cache is True  # the default when no autocast is seen


def test_output_written_and_refused_without_force(tmp_path):
    out = tmp_path / "p.json"
    prof(argv=["--steps", "5"], steps=1, output=out)
    p = Profile.load(out)
    assert p.repeated_blocks and json.loads(out.read_text())["schema_version"] == 1
    with pytest.raises(InputError, match="--force"):
        prof(argv=["--steps", "5"], steps=1, output=out)
    prof(argv=["--steps", "5"], steps=1, output=out, force=True)


def test_script_that_raises_saves_the_partial_profile(tmp_path):
    out = tmp_path / "p.json"
    with pytest.raises(ScriptFailed) as ei:
        prof(argv=["--steps", "10", "--fail-at", "3"], steps=5, output=out)
    e = ei.value
    assert e.failure.exc_type == "ValueError" and "boom at step 3" in e.failure.traceback
    assert "tiny_train.py" in e.failure.traceback and "runpy" not in e.failure.traceback
    assert str(out) in str(e)
    p = Profile.load(out)
    assert p.extra["script_failure"]["exc_type"] == "ValueError"
    assert p.repeated_blocks[0].activation_bytes > 0  # the memory step (step 1) was measured


def test_no_optimizer_and_never_steps():
    with pytest.raises(ScriptError, match="no torch.optim optimizer"):
        prof(argv=["--no-optimizer"])
    with pytest.raises(ScriptError, match="never called optimizer.step"):
        prof(argv=["--no-step"])


def test_missing_script():
    with pytest.raises(ScriptError, match="not found"):
        prof("nope/train.py")


def test_all_steps_warmup():
    with pytest.raises(ScriptError, match="warm-up"):
        prof(argv=["--steps", "2"], steps=3, warmup=2)


def test_no_stop_runs_the_script_to_its_end(capsys):
    p = prof(argv=["--steps", "6"], steps=2, stop=False)
    assert p.extra["session"]["steps_done"] == 6 and not p.extra["session"]["stopped"]
    assert "done 6" in capsys.readouterr().out


def test_blocks_glob():
    p = prof(argv=["--steps", "5"], steps=1, blocks_pattern="blocks.*.fc")
    assert [b.name for b in p.repeated_blocks] == ["blocks.0.fc", "blocks.1.fc", "blocks.2.fc"]
    assert all(b.activation_bytes == 4 * 4 * 16 for b in p.repeated_blocks)  # fc saves its (4, 16) input


def test_backward_watch_is_removed_after_profiling():
    import torch

    orig = torch.autograd.backward
    prof(argv=["--steps", "5"], steps=1)
    assert torch.autograd.backward is orig


def test_torch_compiled_model_is_profiled_eagerly():
    p = prof(argv=["--steps", "8", "--compile"], steps=2)
    assert any("torch.compile" in n for n in p.notes)
    assert [b.name for b in p.repeated_blocks] == ["blocks.0", "blocks.1", "blocks.2"]  # the hooks saw them
    # then four compiled steps: the first compiles, three are measured (on a GPU their peak too)
    c = p.extra["compiled"]
    assert c["steps"] == 3 and 0 < c["step_s"] < 5 and c["peak_bytes"] is None
    assert p.steps == 2 and p.extra["session"]["steps_done"] == 1 + 2 + 4
    assert len(p.repeated_blocks) == 3 and p.repeated_blocks[0].activation_bytes > 0


COMPILED_STEP = """
import torch, torch.nn as nn
net = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3)])
opt = torch.optim.SGD(net.parameters(), lr=0.1)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))

@torch.compile(backend="eager")
def train_step(x):
    loss = net(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()

for _ in range(12):
    train_step(torch.randn(8, 16))
    sched.step()
"""


def test_a_compiled_train_step_function_is_run_compiled_too(tmp_path):
    # the script compiles its step, not its model: profiled eagerly, then run compiled like a compiled model;
    # the LR schedule's float makes a later step compile again, and that step is not the step time
    script = tmp_path / "compiled_step.py"
    script.write_text(COMPILED_STEP)
    p = prof(str(script), steps=2, warmup=1)
    assert any("compile's a function" in n for n in p.notes), p.notes
    assert len(p.repeated_blocks) == 3 and p.repeated_blocks[0].activation_bytes > 0  # the hooks saw them
    c = p.extra["compiled"]
    assert p.extra["session"]["steps_done"] == 1 + 2 + 4
    assert 1 <= c["steps"] < 3 and c["step_s"] > 0  # one of the three after the first compiled again


@pytest.mark.gpu
def test_gpu_profile_reads_the_allocator():
    b, w = 256, 512
    p = prof(argv=["--steps", "10", "--batch-size", str(b), "--width", str(w), "--device", "cuda"])
    assert p.device == "cuda" and p.peak.measured and p.hardware.gpu_name
    assert p.peak.phase in ("forward", "loss", "backward", "optimizer")
    states = p.param_bytes + p.optimizer_state_bytes
    assert p.peak.allocated_bytes >= states + sum(x.activation_bytes for x in p.blocks)
    expected = 4 * (b * w + 2 * b * 4 * w)
    assert all(x.activation_bytes == expected for x in p.repeated_blocks)
    assert all(x.activation_bytes_bf16_params == expected // 2 for x in p.repeated_blocks)  # bf16 probe
    # the block's forward holds at least what it saves
    assert all(x.transient_bytes >= expected for x in p.repeated_blocks)
    assert p.step_start_bytes >= states and p.step_s > 0
    assert all(x.fwd_s > 0 and x.bwd_s > 0 for x in p.repeated_blocks)
    # the peak before backward is called: the forward's, the loss's forward included
    assert p.step_start_bytes < p.extra["forward_peak_bytes"] <= p.peak.allocated_bytes


def test_memory_timeline_on_cpu_says_it_needs_a_gpu(tmp_path):
    p = prof(argv=["--steps", "5"], output=tmp_path / "p.json", memory_timeline=True)
    assert any("--memory-timeline needs a CUDA GPU" in n for n in p.notes)
    assert "memory_timeline" not in p.extra and not (tmp_path / "p.memory.pickle").exists()


def test_memory_timeline_written_beside_the_profile(tmp_path):
    import pickle

    from memtune.profilers.runner import _save_memory_timeline

    p, out = Profile(), tmp_path / "run.json"
    snap = {"segments": [], "device_traces": [[{"action": "alloc", "addr": 1, "size": 64, "time_us": 5}]]}
    _save_memory_timeline(p, snap, out)
    assert p.extra["memory_timeline"] == "run.memory.pickle"
    assert pickle.loads((tmp_path / "run.memory.pickle").read_bytes()) == snap


@pytest.mark.gpu
def test_gpu_memory_timeline_reaches_the_report(tmp_path):
    from memtune.report import write_report

    p = prof(argv=["--steps", "5", "--device", "cuda"], output=tmp_path / "p.json", memory_timeline=True)
    assert (tmp_path / p.extra["memory_timeline"]).is_file()
    res = write_report(tmp_path / "p.json", tmp_path / "r.html", csv_dir=tmp_path / "csv")
    assert "allocator (measured)" in (tmp_path / "csv" / "timeline.csv").read_text(), res.notes


@pytest.mark.gpu
def test_gpu_profile_measures_how_far_the_script_runs_ahead_of_the_backward():
    # a GPU-bound step: the script reaches optimizer.step() while the GPU still runs the backward it queued
    # (3 steps: with 2 the memory and timing marks share one step, and the lag is not read)
    p = prof(GPT, ["--steps", "10", "--device", "cuda", "--batch-size", "16"], steps=3, warmup=1)
    lag = p.extra["backward_lag_s"]
    assert 0 <= lag < p.step_s
    assert "backward_lag_s" not in prof(GPT, ["--steps", "10"], steps=2, warmup=1).extra  # CPU: no lag


def test_saved_before_the_blocks_is_told_apart_from_the_loss():
    # a ResNet stem's max-pool saves its input and indices outside every block, before layer1.0: they live to
    # the end of backward; the loss's saved tensors (after the blocks) go with the loss's backward
    p = prof(str(ROOT / "examples" / "zoo" / "resnet_amp.py"), ["--steps", "10"], steps=2, warmup=1)
    n = 32 * 8  # batch x the stem's width; 16 x 16 before pooling, 8 x 8 after
    assert p.other_activation_before_bytes == 4 * n * 16 * 16 + 8 * n * 8 * 8  # fp32 input, int64 indices
    assert p.other_activation_bytes > p.other_activation_before_bytes  # and the loss's, after the blocks
    g = prof(GPT, ["--steps", "10"], steps=2, warmup=1)
    assert g.other_activation_before_bytes == 0 < g.other_activation_bytes  # the embedding is a block


@pytest.mark.gpu
def test_gpu_a_model_without_repeated_blocks_has_its_large_blocks_probed():
    # lstm_lm: no repeated blocks; the tuner's choice for `rnn` is measured on it, the small embedding's is not
    p = prof(str(ROOT / "examples" / "zoo" / "lstm_lm.py"), ["--steps", "20", "--device", "cuda"], steps=3, warmup=1)
    assert not p.repeated_blocks
    assert {"keep", "recompute", "offload"} <= set(p.block("rnn").what_ifs)
    assert not p.block("encoder").what_ifs


@pytest.mark.gpu
def test_gpu_a_batch_of_one_is_probed_at_twice_the_batch():
    # a batch of one cannot be halved: the repeated block runs at batch 2 too (its time then tells how much of
    # it does not scale), and twice the batch takes longer and keeps more
    p = prof(GPT, ["--steps", "10", "--device", "cuda", "--batch-size", "1"], steps=2, warmup=1)
    w = p.repeated_blocks[0].what_ifs
    assert "half" not in w and "double" in w
    assert w["double"].fwd_s > w["keep"].fwd_s and w["double"].kept_bytes > w["keep"].kept_bytes


@pytest.mark.gpu
def test_gpu_mode_probes_time_the_host_and_offload_costs_it_more():
    # the probe times the host issuing each mode; offload's pack and unpack hooks add host time per saved
    # tensor (the cost model charges it to host-bound scripts), and its pinned buffers come from the cache
    # after the first rep (a group kept alive by a cycle made each rep allocate anew: ~20x keep's forward)
    p = prof(GPT, ["--steps", "10", "--device", "cuda"], steps=2, warmup=1)
    w = p.repeated_blocks[0].what_ifs
    keep, off = w["keep"], w["offload"]
    assert keep.fwd_host_s > 0 and keep.bwd_host_s > 0
    assert off.fwd_host_s + off.bwd_host_s > keep.fwd_host_s + keep.bwd_host_s
    assert off.fwd_host_s < 10 * keep.fwd_host_s + 0.005
