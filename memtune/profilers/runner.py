"""`profile_script`: run a training script in a Session and measure what its memory and time are made of.

The recorder (recorder.py) hooks the run; the probes (probes.py) re-run a block per class in a what-if
configuration; assemble.py turns it all into a Profile.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from memtune import __version__
from memtune.capture import ScriptFailure, Session
from memtune.errors import ScriptError
from memtune.profile import Profile
from memtune.profilers.assemble import _hardware, assemble
from memtune.profilers.probes import host_one_pass_rate, host_update_rate
from memtune.profilers.recorder import Profiler


class ScriptFailed(ScriptError):
    """The user's script raised; `profile` holds what was measured before it did."""

    def __init__(self, failure: ScriptFailure, profile: Profile, saved_to: str | None = None):
        self.failure = failure
        self.profile = profile
        self.saved_to = saved_to
        where = f"; what was measured is saved in {saved_to}" if saved_to else ""
        super().__init__(f"the script raised {failure}{where}: fix the script (its traceback is above)")


def profile_script(script: str | None = None, *, module: str | None = None, argv: Sequence[str] = (),
                   steps: int = 5, warmup: int = 1, stop: bool = True, blocks_pattern: str | None = None,
                   output: str | os.PathLike | None = None, force: bool = False, measure_hardware: bool = True,
                   on_progress: Callable[[int, int | None], None] | None = None,
                   memory_timeline: bool = False, relaunch: Sequence[str] | None = None,
                   end_group: bool = False) -> Profile:
    """Run `script` (or `-m module`) with `argv` for `warmup + steps` optimizer steps and return its Profile.

    Writes it to `output` when given (refusing an existing file unless `force`; rank 0 only). A script that
    raises -> `ScriptFailed` carrying the partial profile (saved to `output` first); one that builds no
    optimizer or never steps -> `ScriptError` saying what was seen. `memory_timeline`: on a GPU, record the
    allocator's history over the memory step and write it beside `output` (PROFILE.memory.pickle, a
    `torch.cuda.memory._snapshot()`; pytorch.org/memory_viz opens it too), named in `extra.memory_timeline`.
    `relaunch`: the command a script that starts its own other ranks (Lightning) starts instead (`Session`).
    `end_group` (the CLI, whose process exits next): destroy the process group the stopped script left alive.
    """
    from memtune.io import check_writable

    out_path = check_writable(output, force) if output is not None else None
    if memory_timeline and out_path is not None and torch.cuda.is_available():  # the snapshot goes beside it
        check_writable(out_path.with_name(out_path.stem + ".memory.pickle"), force)
    session = Session(script, module=module, argv=argv, steps=steps, warmup=warmup, stop=stop,
                      blocks_pattern=blocks_pattern, relaunch=relaunch)
    prof_state = Profiler(session, on_progress=on_progress)
    prof_state.memory_timeline = memory_timeline
    session.on_before_run.append(prof_state.before_run)
    session.on_ready.append(prof_state.ready)
    session.on_step.append(prof_state.on_step)
    session.on_end.append(prof_state.end)
    start = datetime.datetime.now(datetime.timezone.utc)
    session.run()

    prof = Profile(memtune_version=__version__, torch_version=torch.__version__,
                   created=start.isoformat(timespec="seconds"), script=script, module=module, argv=list(argv),
                   cwd=os.getcwd(), steps=0, warmup=warmup)
    prof.extra["session"] = {"steps_done": session.steps_done, "stopped": session.stopped,
                             "scaler_skipped_steps": session.scaler_skipped,
                             "wall_s": (session.end_time or 0) - (session.start_time or 0)}
    if session.model is not None:
        try:
            assemble(prof_state, session, prof)
        except Exception as e:  # a half-measured step after a crash must not hide the script's own error
            if session.failure is None:
                raise
            prof.notes.append(f"profile incomplete ({type(e).__name__}: {e})")
        prof.hardware = _hardware(prof.device, measure_hardware)
        if measure_hardware and prof.device == "cuda" and session.optimizers:
            try:  # optimizer-state offload would run this update on the host: how fast is it here?
                prof.hardware.host_update_params_per_s = host_update_rate(session.optimizers[0])
                prof.hardware.host_one_pass_params_per_s = host_one_pass_rate(session.optimizers[0])
            except Exception as e:  # an extra: its failure costs the number, not the profile
                prof.notes.append(f"host update rate not measured ({type(e).__name__}: {str(e)[:120]})")
    prof.steps = max(0, session.steps_done - warmup - len(prof_state.compiled_done))
    if prof_state.clip_grad_norm is not None:
        prof.extra["clip_grad_norm"] = prof_state.clip_grad_norm
    if (lag := prof_state.backward_lag()) is not None:
        prof.extra["backward_lag_s"] = lag
    if prof_state.head_output_uses is not None:
        prof.extra["head_output_uses"] = prof_state.head_output_uses
    prof.notes.extend(prof_state.notes)
    if len(session.optimizers) > 1:
        prof.notes.append(f"{len(session.optimizers)} optimizers: steps counted on the first "
                          f"({type(session.optimizers[0]).__name__})")
    if session.scaler_skipped:
        prof.notes.append(f"GradScaler skipped {session.scaler_skipped} optimizer step(s) (inf/nan gradients)")
    if steps and session.steps_done < warmup + steps and session.failure is None:
        prof.notes.append(f"the script ended after {session.steps_done} steps, before the {warmup + steps} asked for")

    is_main = session.rank == 0
    if session.failure is not None:
        prof.extra["script_failure"] = {"exc_type": session.failure.exc_type, "message": session.failure.message}
        saved = None
        if out_path is not None and is_main and session.model is not None:
            prof.save(out_path)
            saved = str(out_path)
        raise ScriptFailed(session.failure, prof, saved)
    if not session.optimizers:
        raise ScriptError(
            f"{session.name} built no torch.optim optimizer (it ran to its end"
            f"{' and exited' if not session.stopped else ''}): memtune profiles training scripts that call "
            "optimizer.step(); check the arguments after --")
    if session.model is None:
        raise ScriptError(
            f"{session.name} built {type(session.optimizers[0]).__name__} but no nn.Module holding its parameters "
            "ran a forward: memtune needs the model as a torch.nn.Module")
    if session.steps_done == 0:
        raise ScriptError(
            f"{session.name} built {type(session.optimizers[0]).__name__} for {type(session.model).__name__} "
            f"({len(prof.blocks)} blocks) but never called optimizer.step(): check its arguments (e.g. --steps)")
    if session.steps_done <= warmup:
        raise ScriptError(
            f"{session.name} ran only {session.steps_done} optimizer step(s), all of them warm-up: "
            f"lower --warmup (now {warmup}) or let the script run more steps")
    if memory_timeline:
        _save_memory_timeline(prof, prof_state.snapshot, out_path if is_main else None)
    if out_path is not None and is_main:
        prof.save(out_path)
    if end_group:
        session.end_group()
    return prof


def _save_memory_timeline(prof: Profile, snapshot: dict[str, Any] | None, out_path: Any) -> None:
    import pickle

    from memtune.io import write_bytes_atomic

    if snapshot is None:
        prof.notes.append("--memory-timeline needs a CUDA GPU (PyTorch's allocator history): not recorded")
        return
    if out_path is None:
        prof.notes.append("--memory-timeline is written beside the profile file: give -o to keep it")
        return
    path = out_path.with_name(out_path.stem + ".memory.pickle")
    write_bytes_atomic(path, pickle.dumps(snapshot))
    prof.extra["memory_timeline"] = path.name  # relative: the report looks beside the profile
