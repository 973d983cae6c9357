"""Energy while a benchmark runs, from what the board exposes; never a made-up number.

* x86: Intel RAPL package counters, ``/sys/class/powercap/intel-rapl:N/energy_uj`` (cumulative
  microjoules, wrapping at ``max_energy_range_uj``; often readable by root only);
* Jetson: the INA3221 rail monitors, ``in_power*_input`` (milliwatts) under
  ``/sys/bus/i2c/drivers/ina3221*/`` or ``/sys/class/hwmon/``, sampled on a thread and
  integrated (tegrastats reads the same sensors).

``EnergyMeter().measure()`` is a context manager whose result holds joules, or None with the
reason the board does not say.
"""

from __future__ import annotations

import glob
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Energy:
    joules: float | None
    source: str  # "rapl", "jetson-ina3221", or why there is no figure
    seconds: float = 0.0

    def per_mpx(self, mpx: float) -> float | None:
        return None if self.joules is None or mpx <= 0 else self.joules / mpx

    def describe(self) -> str:
        return f"{self.joules:.3f} J ({self.source})" if self.joules is not None \
            else f"n/a ({self.source})"


def _readable(path: str) -> bool:
    try:
        Path(path).read_text()
        return True
    except OSError:
        return False


def rapl_domains() -> list[Path]:
    """Top-level RAPL package domains whose counters this process can read."""
    return [Path(p) for p in sorted(glob.glob("/sys/class/powercap/intel-rapl:[0-9]"))
            if _readable(f"{p}/energy_uj")]


def jetson_rails() -> list[Path]:
    patterns = ("/sys/bus/i2c/drivers/ina3221*/*/hwmon/hwmon*/in*_input",
                "/sys/bus/i2c/drivers/ina3221*/*/iio:device*/in_power*_input",
                "/sys/class/hwmon/hwmon*/in_power*_input")
    rails = []
    for pattern in patterns:
        rails += [Path(p) for p in sorted(glob.glob(pattern))
                  if "power" in Path(p).name and _readable(p)]
    return rails


class EnergyMeter:
    def __init__(self, sample_s: float = 0.05) -> None:
        self.sample_s = sample_s
        self.rapl = rapl_domains()
        self.rails = [] if self.rapl else jetson_rails()

    @property
    def available(self) -> str | None:
        """None if energy can be measured here, else why not."""
        if self.rapl or self.rails:
            return None
        if glob.glob("/sys/class/powercap/intel-rapl:*"):
            return "RAPL counters present but not readable (root only on this kernel)"
        return "no RAPL counters or Jetson power rails readable on this machine"

    @contextmanager
    def measure(self) -> Iterator[Energy]:
        result = Energy(None, self.available or "")
        started = time.perf_counter()
        if self.rapl:
            before = [int((d / "energy_uj").read_text()) for d in self.rapl]
            yield result
            joules = 0.0
            for domain, first in zip(self.rapl, before, strict=True):
                last = int((domain / "energy_uj").read_text())
                if last < first:  # the counter wrapped
                    last += int((domain / "max_energy_range_uj").read_text())
                joules += (last - first) / 1e6
            result.joules, result.source = joules, "rapl"
        elif self.rails:
            samples: list[tuple[float, float]] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    watts = sum(int(p.read_text()) for p in self.rails) / 1e3
                    samples.append((time.perf_counter(), watts))
                    stop.wait(self.sample_s)

            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
            try:
                yield result
            finally:
                stop.set()
                thread.join()
            joules = sum((t1 - t0) * (w0 + w1) / 2
                         for (t0, w0), (t1, w1) in zip(samples, samples[1:], strict=False))
            result.joules = joules if len(samples) > 1 else None
            result.source = "jetson-ina3221" if len(samples) > 1 else "too short to sample"
        else:
            yield result
        result.seconds = time.perf_counter() - started
