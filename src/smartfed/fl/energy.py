"""Energy per round with CodeCarbon, saying how it was obtained.

Without RAPL (as on most VMs and this project's CI) CodeCarbon estimates CPU
power as TDP × load; the method string says so, so nobody reads an estimate as
a measurement.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path


class EnergyMeter:
    """start()/stop() around a round; stop() returns (kWh or None, method)."""

    def __init__(self, mode: str, output_dir: Path) -> None:
        self.mode = mode
        self.output_dir = output_dir
        self._tracker = None

    def start(self) -> None:
        if self.mode != "codecarbon":
            return
        try:
            from codecarbon import OfflineEmissionsTracker

            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._tracker = OfflineEmissionsTracker(
                    country_iso_code="USA",
                    save_to_file=False,
                    log_level="error",
                    measure_power_secs=1,
                    output_dir=str(self.output_dir),
                    tracking_mode="machine",
                )
                self._tracker.start()
        except Exception:  # codecarbon missing or failing must never stop a federation
            self._tracker = None

    def stop(self) -> tuple[float | None, str]:
        if self.mode != "codecarbon":
            return None, "disabled"
        if self._tracker is None:
            return None, "codecarbon unavailable"
        try:
            self._tracker.stop()
            data = self._tracker.final_emissions_data
            energy = float(data.energy_consumed)
            rapl = os.path.exists("/sys/class/powercap/intel-rapl") and os.access(
                "/sys/class/powercap/intel-rapl", os.R_OK
            )
            method = "codecarbon (RAPL)" if rapl else "codecarbon estimate: TDP x CPU load, no RAPL (not a measurement)"
            return energy, method
        except Exception as err:
            return None, f"codecarbon failed: {type(err).__name__}"
        finally:
            self._tracker = None
