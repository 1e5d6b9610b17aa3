"""The framework integrations: the transformers and Lightning callbacks apply a plan inside the framework's
own loop and undo it (checked by equivalence: `checkpoint: all` trains to the same weights bit for bit), and
`memtune export` maps a plan to each framework's settings, saying what has none."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from typer.testing import CliRunner

from memtune.cli import app
from memtune.strategies import plan_from_dict

runner = CliRunner()

# --- transformers ---------------------------------------------------------------------------------------


def _hf_run(tmp_path, callbacks, **training_args):
    tr = pytest.importorskip("transformers")

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            ids = (torch.arange(16) * (i % 5 + 1) + i) % 64
            return {"input_ids": ids, "labels": ids.clone()}

    class Seen(tr.TrainerCallback):
        """What the model's blocks look like at each step (after every on_train_begin)."""

        def __init__(self):
            self.modes = []

        def on_step_begin(self, args, state, control, model=None, **kw):
            self.modes.append([getattr(b.forward, "_memtune_checkpoint", None) for b in model.model.layers])

    tr.set_seed(0)
    cfg = tr.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, use_cache=False)
    model = tr.LlamaForCausalLM(cfg)
    args = tr.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, use_cpu=True,
                                report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                                learning_rate=1e-2, dataloader_num_workers=0, **training_args)
    seen = Seen()
    trainer = tr.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[*callbacks, seen])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model, trainer, seen.modes, losses


def test_hf_callback_applies_at_train_begin_and_undoes_at_train_end(tmp_path):
    from memtune.integrations.transformers import MemtuneCallback

    base, _, base_modes, base_losses = _hf_run(tmp_path / "a", [])
    lines = []
    cb = MemtuneCallback({"checkpoint": {"blocks": "all"}, "optimizer": {"name": "adamw"}}, log=lines.append)
    model, trainer, modes, losses = _hf_run(tmp_path / "b", [cb])

    assert base_modes == [[None, None]] * 3
    assert modes == [["full", "full"]] * 3  # every step ran with both layers checkpointed
    assert ("checkpoint", "full checkpointing on 2 block(s): model.layers.0, model.layers.1") in cb.notes
    assert ("optimizer", "AdamW -> adamw") in cb.notes  # the torch optimizer inside accelerate's wrapper
    assert lines == [f"memtune: {s}: {n}" for s, n in cb.notes]
    # lossless: the same losses and the same weights, bit for bit
    assert losses == base_losses and len(losses) == 3
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), model.parameters(), strict=True))
    # undone at train end
    assert not cb.active
    assert all("forward" not in b.__dict__ for b in model.model.layers)
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert type(trainer.optimizer.optimizer) is torch.optim.AdamW


def test_hf_exported_settings_train_as_the_plan_does(tmp_path):
    """What `memtune export --to hf` prints for checkpoint + bf16 autocast, given to TrainingArguments, trains
    to the same losses and weights as the plan applied by the callback."""
    from memtune.integrations.export import export_plan
    from memtune.integrations.transformers import MemtuneCallback

    plan = plan_from_dict({"checkpoint": {"blocks": "all"}, "precision": {"autocast": "bf16"}})
    exp = export_plan(plan, "hf")
    assert exp.rest == {} and all(s.exact for s in exp.settings)
    by_settings, _, _, losses_a = _hf_run(tmp_path / "a", [], **{s.name: s.value for s in exp.settings})
    by_callback, _, modes, losses_b = _hf_run(tmp_path / "b", [MemtuneCallback(plan, log=lambda line: None)])
    assert modes == [["full", "full"]] * 3
    assert losses_a == losses_b
    assert all(torch.equal(a, b) for a, b in zip(by_settings.parameters(), by_callback.parameters(), strict=True))


def test_unwrap_optimizer_sees_through_wrappers():
    from memtune.blocks import unwrap_optimizer

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)

    class Wrapper:  # accelerate's AcceleratedOptimizer keeps it as .optimizer, Lightning's as ._optimizer
        def __init__(self, inner, attr):
            setattr(self, attr, inner)

    assert unwrap_optimizer(Wrapper(opt, "optimizer")) is opt
    assert unwrap_optimizer(Wrapper(opt, "_optimizer")) is opt
    assert unwrap_optimizer(opt) is opt


def test_apply_plan_changes_the_optimizer_inside_accelerates_wrapper():
    import memtune

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)

    class Prepared(torch.optim.Optimizer):  # as accelerate's AcceleratedOptimizer: the real one as .optimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    # the wrapper is no Adam: the swap would be refused if apply_plan did not look inside it
    undo = memtune.apply_plan(model, Prepared(inner), {"optimizer": {"name": "adamw"}})
    assert undo.notes == [("optimizer", "AdamW -> adamw")]
    undo()
    assert type(inner) is torch.optim.AdamW


# --- Lightning ------------------------------------------------------------------------------------------


def _lightning_module(fail_at=None):
    L = pytest.importorskip("lightning.pytorch")

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 16)
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)  # dropout: RNG replayed
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(16, 32)
            self.losses, self.modes = [], []

        def forward(self, x):
            return self.head(self.encoder(self.embed(x)))

        def training_step(self, batch, i):
            if fail_at is not None and i == fail_at:
                raise RuntimeError("the user's training_step failed")
            x, y = batch
            self.modes.append([getattr(b.forward, "_memtune_checkpoint", None) for b in self.encoder.layers])
            loss = F.cross_entropy(self(x).flatten(0, 1), y.flatten())
            self.losses.append(loss.detach().clone())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    return L, Tiny


def _lightning_run(callbacks, fail_at=None):
    L, Tiny = _lightning_module(fail_at)
    L.seed_everything(0, verbose=False)
    module = Tiny()
    x = torch.randint(32, (24, 8), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.roll(1, 1)), batch_size=8)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, loader)
    return module


def test_lightning_callback_applies_at_fit_start_and_undoes_at_train_end():
    from memtune.integrations.lightning import MemtuneCallback

    base = _lightning_run([])
    lines = []
    cb = MemtuneCallback({"checkpoint": {"blocks": "all"}}, log=lines.append)
    module = _lightning_run([cb])

    assert base.modes == [[None, None]] * 3
    assert module.modes == [["full", "full"]] * 3
    assert cb.notes == [("checkpoint", "full checkpointing on 2 block(s): encoder.layers.0, encoder.layers.1")]
    assert lines == ["memtune: checkpoint: full checkpointing on 2 block(s): encoder.layers.0, encoder.layers.1"]
    assert torch.equal(torch.stack(base.losses), torch.stack(module.losses))
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), module.parameters(), strict=True))
    assert not cb.active
    assert all("forward" not in b.__dict__ for b in module.encoder.layers)


def test_lightning_callback_undoes_when_the_fit_raises():
    from memtune.integrations.lightning import MemtuneCallback

    cb = MemtuneCallback({"checkpoint": {"blocks": "all"}}, log=lambda line: None)
    with pytest.raises(RuntimeError, match="training_step failed"):
        _lightning_run([cb], fail_at=1)
    assert not cb.active and cb.notes


def test_lightning_callback_is_both_packages_callback():
    from memtune.integrations.lightning import MemtuneCallback

    cb = MemtuneCallback({"checkpoint": {"blocks": "all"}})
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            pkg = __import__(name, fromlist=["Callback"])
        except ImportError:
            continue
        assert isinstance(cb, pkg.Callback)


def test_a_bad_plan_fails_when_the_callback_is_built():
    from memtune.errors import PlanError
    from memtune.integrations.lightning import MemtuneCallback

    with pytest.raises(PlanError, match="unknown section 'chekpoint'"):
        MemtuneCallback({"chekpoint": {"blocks": "all"}})


# --- memtune export ---------------------------------------------------------------------------------------

PLAN = """run: {script: train.py, knobs: {--batch-size: 16, --gradient-accumulation-steps: 2, --lr: 0.001}}
checkpoint: {blocks: all}
precision: {autocast: bf16}
optimizer: {name: adamw}
weights: {format: nf4}
"""


def _export(tmp_path, text, target, *extra):
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    return runner.invoke(app, ["export", str(p), "--to", target, *extra])


def _json(tmp_path, text, target):
    r = _export(tmp_path, text, target, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_export_hf_prints_training_arguments_and_what_has_none(tmp_path):
    r = _export(tmp_path, PLAN, "hf")
    assert r.exit_code == 0, r.output
    out = r.stdout
    for code in ("activation_checkpointing=True,", 'activation_checkpointing_kwargs={"use_reentrant": False},',
                 "bf16=True,", 'optim="adamw_torch_fused",', "per_device_train_batch_size=16,",
                 "gradient_accumulation_steps=2,"):
        assert f"    {code}" in out, out
    assert "cannot be expressed in transformers.TrainingArguments" in out
    assert "  weights {blocks: all, format: nf4}: TrainingArguments does not quantize frozen weights" in out
    assert "  run.knobs.--lr 0.001: a flag of your script" in out
    assert "memtune.integrations.transformers.MemtuneCallback(REST)" in out
    assert "  weights: {blocks: all, format: nf4}" in out  # the rest, as YAML


def test_export_hf_json_is_real_training_arguments(tmp_path):
    tr = pytest.importorskip("transformers")
    d = _json(tmp_path, PLAN, "hf")
    kwargs = {s["name"]: s["value"] for s in d["settings"]}
    assert kwargs == {"bf16": True, "optim": "adamw_torch_fused", "activation_checkpointing": True,
                      "activation_checkpointing_kwargs": {"use_reentrant": False}, "per_device_train_batch_size": 16,
                      "gradient_accumulation_steps": 2}
    args = tr.TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[], **kwargs)
    assert args.activation_checkpointing and args.optim == "adamw_torch_fused"
    assert [u["part"] for u in d["unexpressed"]] == ["weights", "run.knobs.--lr"]
    assert d["rest"] == {"weights": {"blocks": "all", "format": "nf4"}} and d["rest_problem"] is None
    plan_from_dict(d["rest"])  # what the callback gets is a plan


def test_export_hf_leaves_what_gradient_checkpointing_cannot_say(tmp_path):
    d = _json(tmp_path, "checkpoint: {blocks: [0, 1], mode: selective}\n", "hf")
    assert d["settings"] == []
    assert d["unexpressed"][0]["part"] == "checkpoint"
    assert "no selective mode" in d["unexpressed"][0]["reason"]
    # with the blocks' weights streamed from the host, even `all` stays with memtune (both act on the blocks)
    d = _json(tmp_path, "checkpoint: {blocks: all}\noffload: {optimizer_state: true, gradients: true, params: all}\n",
              "hf")
    assert [s["name"] for s in d["settings"]] == []
    assert set(d["rest"]) == {"checkpoint", "offload"}
    r = _export(tmp_path, "checkpoint: {blocks: [0, 1], mode: selective}\n", "hf")
    assert "nothing in" in r.stdout and "has a setting in transformers.TrainingArguments" in r.stdout


def test_export_optimizers_to_hf(tmp_path):
    tr = pytest.importorskip("transformers")
    names = {o.value for o in tr.training_args.OptimizerNames}
    fields = {f.name for f in dataclasses.fields(tr.TrainingArguments)}
    for name, optim in (("adamw8bit", "adamw_bnb_8bit"), ("adamw4bit", "adamw_torch_4bit"),
                        ("adafactor", "adafactor"), ("galore", "galore_adamw")):
        d = _json(tmp_path, f"optimizer: {{name: {name}}}\n", "hf")
        kw = {s["name"]: s for s in d["settings"]}
        assert kw["optim"]["value"] == optim and optim in names
        assert set(kw) <= fields
        assert not kw["optim"]["exact"] and kw["optim"]["note"]  # another implementation: said so
    d = _json(tmp_path, "optimizer: inbackward\n", "hf")
    assert d["settings"] == [] and "lomo" in d["unexpressed"][0]["reason"]


def test_export_lightning(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    r = _export(tmp_path, PLAN, "lightning")
    assert r.exit_code == 0, r.output
    assert '    precision="bf16-mixed",' in r.stdout and "    accumulate_grad_batches=2," in r.stdout
    assert "cannot be expressed in lightning.pytorch.Trainer" in r.stdout
    d = _json(tmp_path, PLAN, "lightning")
    kwargs = {s["name"]: s["value"] for s in d["settings"]}
    assert kwargs == {"precision": "bf16-mixed", "accumulate_grad_batches": 2}
    assert [u["part"] for u in d["unexpressed"]] == ["optimizer", "weights", "checkpoint", "run.knobs.--batch-size",
                                                     "run.knobs.--lr"]
    assert set(d["rest"]) == {"optimizer", "weights", "checkpoint"}
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        **kwargs)
    assert trainer.accumulate_grad_batches == 2
    d = _json(tmp_path, "precision: {params: bf16, master_weights: false}\n", "lightning")
    assert [(s["name"], s["value"], s["exact"]) for s in d["settings"]] == [("precision", "bf16-true", False)]


def test_export_accelerate(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    text = "sharding: {stage: 3}\noffload: {optimizer_state: true}\nprecision: {autocast: bf16}\n"
    r = _export(tmp_path, text, "accelerate")
    assert r.exit_code == 0, r.output
    assert "from accelerate import FullyShardedDataParallelPlugin" in r.stdout
    assert ("    fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True, "
            "cpu_offload=True),") in r.stdout
    d = _json(tmp_path, text, "accelerate")
    assert {s["name"] for s in d["settings"]} <= set(inspect.signature(accelerate.Accelerator).parameters)
    assert d["unexpressed"] == [] and d["rest"] == {}
    # anything left for memtune keeps the sharding with it
    d = _json(tmp_path, text + "compress: {blocks: [0]}\n", "accelerate")
    assert [s["name"] for s in d["settings"]] == ["mixed_precision"]
    assert set(d["rest"]) == {"compress", "sharding", "offload"}


@pytest.mark.parametrize("args, expect", [
    (["--to", "deepspeed"], "unknown export target 'deepspeed'; choose one of: hf, lightning, accelerate"),
    ([], "Missing option '--to'"),
])
def test_export_bad_target_is_one_line(tmp_path, args, expect):
    p = tmp_path / "plan.yaml"
    p.write_text(PLAN)
    r = runner.invoke(app, ["export", str(p), *args])
    assert r.exit_code == 1
    assert expect in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_export_bad_plan_is_one_line(tmp_path):
    r = runner.invoke(app, ["export", str(tmp_path / "nope.yaml"), "--to", "hf"])
    assert r.exit_code == 1 and "not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _export(tmp_path, "chekpoint: {blocks: all}\n", "lightning")
    assert r.exit_code == 1 and "unknown section 'chekpoint'" in r.stderr
