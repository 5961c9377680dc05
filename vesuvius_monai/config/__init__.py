"""Typed run configuration, loaded from YAML.

One keyword-only dataclass per YAML section (:mod:`~vesuvius_monai.config.sections`,
:mod:`~vesuvius_monai.config.scoring`; nested ones for ``synth.params``, ``train.loss`` and
``evaluate.leaderboard``). Every section checks itself the same way when it is built, from YAML or from Python
(:mod:`~vesuvius_monai.config.checks`): a problem raises a :class:`VesuviusError` naming the key
(``config key 'train.lr': ...``); unknown keys are rejected with a did-you-mean hint. The built-in defaults are the
benchmarked recipe.

A run's config is resolved in one step from its layers (:func:`resolve_config`, in
:mod:`~vesuvius_monai.config.resolve`): built-in defaults < a stored run config < ``plan.yaml`` <
``postprocess.json`` < the config file < ``key=value`` overrides (``train.steps=50 model.kwargs.init_features=8``).

YAML holds plain values; turning them into models, losses and transforms happens in Python
(``models.build_model``, ``losses.build_loss``, ``data.transforms.train_augmentations`` ...). Importing this
package pulls in nothing heavier than PyYAML.
"""

from vesuvius_monai.config.checks import check_fields, choice, coerce, finite, from_dict, integer, require
from vesuvius_monai.config.resolve import (RENAMED_KEYS, Layer, build, config_from_raw, covered, dotted_layer,
                                           explicit_keys, flatten, load_config, mapping_layer, overrides_layer,
                                           parse_override,
                                           read_yaml_mapping, resolve_config, save_config, to_dict, upgrade_raw)
from vesuvius_monai.config.scoring import EvaluateConfig, LeaderboardWeights, PostprocessConfig, TuneConfig
from vesuvius_monai.config.sections import (RECIPE_MODEL_KWARGS, Config, DataConfig, InferConfig, LossWeights,
                                            ModelConfig, SynthConfig, SynthParams, TrainConfig, TransformConfig,
                                            Triple)
from vesuvius_monai.metrics.names import DEFAULT_METRICS, METRIC_NAMES, TOPO_MATCHINGS

__all__ = ["Config", "DataConfig", "DEFAULT_METRICS", "EvaluateConfig", "InferConfig", "Layer", "LeaderboardWeights",
           "LossWeights", "METRIC_NAMES", "ModelConfig", "PostprocessConfig", "RECIPE_MODEL_KWARGS", "RENAMED_KEYS",
           "SynthConfig", "SynthParams", "TOPO_MATCHINGS", "TrainConfig", "TransformConfig", "TuneConfig", "Triple",
           "build", "check_fields", "choice", "coerce", "config_from_raw", "covered", "dotted_layer", "explicit_keys",
           "flatten",
           "finite", "from_dict", "integer", "load_config", "mapping_layer", "overrides_layer", "parse_override",
           "read_yaml_mapping", "require", "resolve_config", "save_config", "to_dict", "upgrade_raw"]
