"""Presets: functions that return the config dataclasses of pimjax's runs and experiments.

* :mod:`pimjax.configs.setups`: named model/dataset/recipe setups (``lenet5`` ...
  ``resnet18-cifar100``, the paper's sizes) and their :class:`pimjax.train.TrainConfig`;
* :mod:`pimjax.configs.quickstart`, :mod:`pimjax.configs.montecarlo`,
  :mod:`pimjax.configs.claims`, :mod:`pimjax.configs.drift`: the settings of the scripts in
  ``experiments/``, with their defaults and their ``--smoke`` sizes.

They live in the package (not next to the scripts) so that scripts, tests, notebooks and
user code import them the same way, from an installed pimjax, with no path set-up.
"""

from pimjax.configs import claims, drift, montecarlo, quickstart, setups

__all__ = ["claims", "drift", "montecarlo", "quickstart", "setups"]
