"""Energy of a block of work: measured where the hardware counts it, estimated elsewhere, and marked.

Where the kernel exposes Intel/AMD RAPL counters (``/sys/class/powercap/intel-rapl:N/energy_uj``)
and they are readable, CPU package energy is *measured*: the counters' difference, with their
wrap-around at ``max_energy_range_uj`` handled. Where a GPU is present and NVML (``pynvml``) is
installed, GPU energy is measured from its total-energy counter. Everywhere else (containers, VMs,
machines whose counters are root-only) CPU energy is *estimated* from CPU seconds and a stated power
model; memory energy is always estimated (GB held × seconds × watts per GB). Every figure carries
its mark, and reports print it.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

MEASURED = "measured"
ESTIMATED = "estimated"

DEFAULT_WATTS_PER_CORE = 10.0
"""Watts per busy core when the CPU's TDP is not known: a round figure between a server core's share
of its package TDP (a 28-core, 205 W Xeon Platinum 8280: 7.3 W) and a desktop core's."""

MEMORY_WATTS_PER_GB = 0.375
"""Watts per GB of memory held: 3 W per 8 GB, the figure CodeCarbon's RAM model uses."""

# Package TDP (W) and physical cores of CPUs whose name /proc/cpuinfo reports; extend as needed.
KNOWN_CPUS: dict[str, tuple[float, int]] = {
    "Xeon(R) Platinum 8280": (205.0, 28),
    "Xeon(R) Platinum 8375C": (300.0, 32),
    "Xeon(R) Gold 6248": (150.0, 20),
    "EPYC 7763": (280.0, 64),
    "EPYC 7B13": (240.0, 64),
}


@dataclass(frozen=True)
class PowerModel:
    """How CPU seconds and memory become joules when nothing measures them.

    Attributes:
        watts_per_core: Power of one core kept busy for one second (J per CPU second).
        memory_watts_per_gb: Power of one GB of memory held.
        source: Where ``watts_per_core`` comes from, printed beside every estimate.

    """

    watts_per_core: float = DEFAULT_WATTS_PER_CORE
    memory_watts_per_gb: float = MEMORY_WATTS_PER_GB
    source: str = f"stated default {DEFAULT_WATTS_PER_CORE:g} W per core"

    def __post_init__(self) -> None:
        if not self.watts_per_core > 0 or not self.memory_watts_per_gb >= 0:
            raise ValueError(
                f"a power model needs watts per core > 0 and memory watts per GB >= 0, got "
                f"{self.watts_per_core} and {self.memory_watts_per_gb}"
            )

    def cpu_joules(self, cpu_seconds: float) -> float:
        """Joules of ``cpu_seconds`` of busy cores."""
        return cpu_seconds * self.watts_per_core

    def memory_joules(self, gb_seconds: float) -> float:
        """Joules of holding ``gb_seconds`` GB × seconds of memory."""
        return gb_seconds * self.memory_watts_per_gb

    @staticmethod
    def for_cpu(model_name: str) -> PowerModel:
        """The power model of a CPU by its name: TDP / cores where known, the stated default otherwise."""
        for key, (tdp, cores) in KNOWN_CPUS.items():
            if key in model_name:
                return PowerModel(tdp / cores, source=f"TDP {tdp:g} W / {cores} cores of {key}")
        return PowerModel()

    @staticmethod
    def of_this_machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> PowerModel:
        """The power model of the CPU this process runs on (the default if it cannot tell)."""
        try:
            for line in cpuinfo.read_text().splitlines():
                if line.startswith("model name"):
                    return PowerModel.for_cpu(line.split(":", 1)[1].strip())
        except OSError:
            pass
        return PowerModel()


@dataclass(frozen=True)
class Joules:
    """An amount of energy and whether it was measured or estimated."""

    joules: float
    mark: str

    def __add__(self, other: Joules) -> Joules:
        return Joules(self.joules + other.joules, self.mark if self.mark == other.mark else ESTIMATED)


class Rapl:
    """CPU package energy counters under a powercap tree (``/sys/class/powercap`` by default).

    Only top-level package domains (``intel-rapl:N``, the name file starting with ``package``) are
    summed; their sub-domains (core, uncore, dram) are parts of them.

    Args:
        root: The powercap folder.

    """

    def __init__(self, root: Path = Path("/sys/class/powercap")) -> None:
        self.domains: list[tuple[Path, int]] = []
        if not root.is_dir():
            return
        for d in sorted(root.glob("intel-rapl:*")):
            if d.name.count(":") != 1:
                continue
            try:
                if not (d / "name").read_text().startswith("package"):
                    continue
                int((d / "energy_uj").read_text())  # readable (root-only on many kernels)
                self.domains.append((d, int((d / "max_energy_range_uj").read_text())))
            except (OSError, ValueError):
                continue

    @property
    def available(self) -> bool:
        """Whether at least one package counter is readable."""
        return bool(self.domains)

    def read(self) -> list[int]:
        """Each package counter now, in µJ."""
        return [int((d / "energy_uj").read_text()) for d, _ in self.domains]

    def joules(self, before: list[int], after: list[int]) -> float:
        """Joules between two readings; a counter that wrapped past its range counts once round."""
        out = 0
        for (_, span), a, b in zip(self.domains, before, after, strict=True):
            out += b - a if b >= a else b + span - a
        return out / 1e6


class Nvml:
    """Total energy of every NVIDIA GPU, from NVML where ``pynvml`` and a GPU are present."""

    def __init__(self) -> None:
        self.handles: list = []
        try:
            import pynvml  # optional: only machines with a GPU need it

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no library, no driver or no device: nothing to measure
            self.handles = []

    @property
    def available(self) -> bool:
        """Whether a GPU's energy can be read."""
        return bool(self.handles)

    def read(self) -> list[int]:
        """Each GPU's energy since the driver loaded, in mJ."""
        return [int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self.handles]


@dataclass
class Reading:
    """What one metered block of work used.

    Attributes:
        wall_seconds: Elapsed time.
        cpu_seconds: CPU time of this process (user + system, all threads).
        cpu: CPU energy, measured (RAPL, whole package) or estimated (``cpu_seconds`` × power model).
        gpu: GPU energy (0, measured, when there is no GPU).
        memory: Memory energy, estimated from the peak resident set held for the wall time.
        power_source: Where the estimate's watts per core come from.

    """

    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    cpu: Joules = field(default_factory=lambda: Joules(0.0, ESTIMATED))
    gpu: Joules = field(default_factory=lambda: Joules(0.0, MEASURED))
    memory: Joules = field(default_factory=lambda: Joules(0.0, ESTIMATED))
    power_source: str = ""

    @property
    def total(self) -> Joules:
        """CPU, GPU and memory together (marked estimated if any part is)."""
        return self.cpu + self.gpu + self.memory

    def to_dict(self) -> dict[str, float | str]:
        """JSON-ready, each energy with its mark."""
        return {
            "wall_seconds": self.wall_seconds,
            "cpu_seconds": self.cpu_seconds,
            **{f"{k}_joules": getattr(self, k).joules for k in ("cpu", "gpu", "memory", "total")},
            **{f"{k}_mark": getattr(self, k).mark for k in ("cpu", "gpu", "memory", "total")},
            "power_source": self.power_source,
        }


class EnergyMeter:
    """Meters blocks of work: ``with meter.measure() as r: ...`` fills ``r`` when the block ends.

    Args:
        power: The model for what is estimated (default: this machine's CPU, or the stated default).
        rapl: Package counters (default: the machine's powercap tree, used if readable).
        gpu: GPU counters (default: NVML if present).

    """

    def __init__(
        self, power: PowerModel | None = None, rapl: Rapl | None = None, gpu: Nvml | None = None
    ) -> None:
        self.power = power or PowerModel.of_this_machine()
        self.rapl = rapl if rapl is not None else Rapl()
        self.gpu = gpu if gpu is not None else Nvml()

    @contextmanager
    def measure(self) -> Iterator[Reading]:
        """Meter the enclosed block."""
        out = Reading(power_source=self.power.source)
        rapl0 = self.rapl.read() if self.rapl.available else None
        gpu0 = self.gpu.read() if self.gpu.available else None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        try:
            yield out
        finally:
            out.wall_seconds = time.perf_counter() - wall0
            out.cpu_seconds = time.process_time() - cpu0
            if rapl0 is not None:
                out.cpu = Joules(self.rapl.joules(rapl0, self.rapl.read()), MEASURED)
            else:
                out.cpu = Joules(self.power.cpu_joules(out.cpu_seconds), ESTIMATED)
            if gpu0 is not None:
                out.gpu = Joules(
                    sum(b - a for a, b in zip(gpu0, self.gpu.read(), strict=True)) / 1e3, MEASURED
                )
            out.memory = Joules(self.power.memory_joules(peak_rss_gb() * out.wall_seconds), ESTIMATED)


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
