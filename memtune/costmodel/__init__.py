"""Cost model: simulate one training step block by block and predict its peak memory and time.

- `sim.py`: the contract (BlockSim, SimStep, Estimate) between strategies' effects and the simulator.
- `build.py`: the step as the profile measured it, at any batch size, calibrated on the measured peak.
- `timeline.py`: the simulator (peak of the live-bytes timeline; time with exposed transfers).
- `effects.py`: helpers strategies' effects share.

It never sees a Plan: memtune/estimate.py applies a plan's effects and calls it.
"""

from memtune.costmodel.build import (
    CALIBRATION,
    DEFAULT_PCIE_GBPS,
    build_sim,
    calibration,
    fit_batch,
)
from memtune.costmodel.effects import (
    ModeMeasurement,
    drop_autocast_copies,
    measured_mode,
    note_sources,
    use_bf16_params_probe,
)
from memtune.costmodel.sim import BlockSim, Estimate, SimStep
from memtune.costmodel.timeline import COMPONENTS, simulate

__all__ = ["CALIBRATION", "COMPONENTS", "DEFAULT_PCIE_GBPS", "BlockSim", "Estimate", "ModeMeasurement", "SimStep",
           "build_sim", "calibration", "drop_autocast_copies", "fit_batch", "measured_mode", "note_sources",
           "simulate", "use_bf16_params_probe"]
