"""Deprecated: the old home of the figure code, now split by job. Import from

* :mod:`gradflow.problem`: ``cell_problem``, ``precision``, ``task_stack``;
* :mod:`gradflow.experiments`: ``gradient_grid``, ``vertical_gain``, ``gate_saturation``,
  ``training_runs`` and their unpacking (``panel``, ``gain_panel``, ``stats_panel``,
  ``run_curve``, ``run_record``);
* :mod:`gradflow.plot`: every ``draw_*`` function;
* :mod:`gradflow.reproduce`: the registry of figure kinds, the shipped configs,
  ``figure_data`` and ``reproduce``.

This module only re-exports those names and is removed once nothing imports it.
"""
from gradflow.experiments import (RECORDS, VERTICAL_GAIN, gain_panel, gate_saturation,
                                  gradient_grid, panel, run_curve, run_record, stats_panel,
                                  training_runs, vertical_gain)
from gradflow.plot import (draw_curves, draw_gate_panels, draw_grid, draw_updates)
from gradflow.problem import cell_problem, precision, task_stack
from gradflow.reproduce import (BUILDERS, CONFIG_DIR, FIGURES_DIR, Builder, build, configs,
                                figure_data, from_config, load_config, register, reproduce)

__all__ = ["BUILDERS", "Builder", "CONFIG_DIR", "FIGURES_DIR", "RECORDS", "VERTICAL_GAIN",
           "build", "cell_problem", "configs", "draw_curves", "draw_gate_panels", "draw_grid",
           "draw_updates", "figure_data", "from_config", "gain_panel", "gate_saturation",
           "gradient_grid", "load_config", "panel", "precision", "register", "reproduce",
           "run_curve", "run_record", "stats_panel", "task_stack", "training_runs",
           "vertical_gain"]
