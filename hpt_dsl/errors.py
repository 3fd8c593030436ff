"""Errors that mean bad input, whichever part of the library finds them.

``InputError`` is the base of the errors a user fixes by changing what they gave (a file, a
setting, a model, a reward, a plugin, a run folder): the command line answers every one of
them with one line and exit code 2 (``hpt_dsl.cli.exits``, the one place that maps errors to
exit codes). Its subclasses live beside the code that finds them: ``SetupError`` (here),
``models.ModelError``, ``data.files.DataError``, ``data.verify.RewardError``,
``checkpoint.CheckpointError``, ``rollout.vllm.RolloutEngineError``, ``runs.RunError``,
``estimator.plugins.PluginLoadError``, ``learner.ds_config.DeepSpeedConfigError``. Run faults
(exit code 3) are ``hpt_dsl.faults.RunFault``.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input found before or while setting up a run (exit code 2)."""

    exit_code = 2


class SetupError(InputError):
    """Bad input found before training starts: a run folder, a resume target, a DeepSpeed
    configuration (exit code 2)."""
