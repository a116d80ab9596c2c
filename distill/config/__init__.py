"""One config system: frozen dataclasses per stage, YAML (safe) files, ``key.sub=value`` overrides.

A config file is a mapping whose top-level keys are the sections of :class:`Config`
(``world``, ``teacher``, ``det`` ...) plus ``work_dir``. It may name at most one ``defaults:``
file (relative to itself); that file is loaded first and this one is merged on top. Unknown or
misspelt keys are errors that list the valid keys and the closest match.

String values may use ``{work_dir}``, replaced by the resolved work dir after loading.

>>> cfg = load_config("configs/shapes/vild.yaml", ["det.train.max_steps=10", "world.seed=3"])
>>> cfg.det.train.max_steps
10
"""

from distill.config.load import (
    TEMPLATES_EXPECTED,
    WORDS_EXPECTED,
    config_from_dict,
    config_hash,
    dump_config,
    load_config,
    parse_override,
    read_templates_value,
    save_config,
    to_dict,
)
from distill.config.sections import (
    BackbonePretrainConfig,
    CamConfig,
    ClipSelfConfig,
    ClimsConfig,
    PromptsConfig,
    Config,
    DataConfig,
    DetConfig,
    LabelConfig,
    PipelineConfig,
    PretrainConfig,
    ProposalConfig,
    RegionConfig,
    SegConfig,
    SelftrainConfig,
    TeacherConfig,
    TrainConfig,
    WorldConfig,
)

__all__ = [
    "BackbonePretrainConfig",
    "CamConfig",
    "ClipSelfConfig",
    "ClimsConfig",
    "PromptsConfig",
    "Config",
    "DataConfig",
    "DetConfig",
    "LabelConfig",
    "PipelineConfig",
    "PretrainConfig",
    "ProposalConfig",
    "RegionConfig",
    "SegConfig",
    "SelftrainConfig",
    "TEMPLATES_EXPECTED",
    "TeacherConfig",
    "TrainConfig",
    "WORDS_EXPECTED",
    "WorldConfig",
    "config_from_dict",
    "config_hash",
    "dump_config",
    "load_config",
    "parse_override",
    "read_templates_value",
    "save_config",
    "to_dict",
]
