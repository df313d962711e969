"""sftlab's CPU acceleration layer: one entry point, `apply(model, options) -> Applied`.

The training core (`sftlab.train`, `sftlab.data`) imports nothing from here: the same training runs with this layer
on or off, the numbers equal up to floating-point rounding (see tests/accel/)."""

from sftlab.accel.options import AccelOptions
from sftlab.accel.setup import Applied, apply

__all__ = ["AccelOptions", "Applied", "apply"]
