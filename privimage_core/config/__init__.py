"""The run's configuration: ``Config`` and its loaders, the settings classes
of every section, and the settings derived once the data is known.

``schema.py`` assembles the sections and validates across them;
``sections.py``, ``training.py``, ``evaluation.py``, ``infra.py`` and
``tune.py`` define the core sections (a model family's own section lives in
its folder); ``resolve.py`` derives delta and (k1, k2) from the data;
``types.py`` checks values against the annotations.
"""
from privimage_core.config.evaluation import EvaluationConfig
from privimage_core.config.infra import MetricsConfig, RayConfig, TrackingConfig
from privimage_core.config.resolve import resolve_defaults, resolve_delta, resolve_k
from privimage_core.config.schema import (SCALAR_KEYS, SECTIONS, Config, all_keys, from_dict,
                                          load_config, validate)
from privimage_core.config.sections import (DataConfig, GeneratorConfig, PrivacyConfig,
                                            RunConfig, SamplingConfig, SelectionConfig,
                                            SemanticQueryConfig)
from privimage_core.config.training import (GRAD_SAMPLE_MODES, PRETRAIN_PRECISIONS,
                                            FinetuneConfig, PretrainConfig)
from privimage_core.config.tune import TuneConfig

__all__ = ["GRAD_SAMPLE_MODES", "PRETRAIN_PRECISIONS", "SCALAR_KEYS", "SECTIONS", "Config",
           "DataConfig", "EvaluationConfig", "FinetuneConfig", "GeneratorConfig",
           "MetricsConfig", "PretrainConfig", "PrivacyConfig", "RayConfig", "RunConfig",
           "SamplingConfig", "SelectionConfig", "SemanticQueryConfig", "TrackingConfig",
           "TuneConfig", "all_keys", "from_dict", "load_config", "resolve_defaults",
           "resolve_delta", "resolve_k", "validate"]
