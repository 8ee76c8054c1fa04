"""The run configuration: `schema` (the frozen dataclasses, checked as they are built, and their
YAML files with dotted overrides) and `plain` (dataclasses to and from plain data)."""

from spacejax.config.plain import ConfigError, differences, from_dict, to_dict
from spacejax.config.schema import (ARCHITECTURES, ATTENTION, BATCH_AXES, DTYPES, KNOWN_TRUTH_SOURCES, MESH_AXES, PROMPT_FORMATS, REMAT_POLICIES,
                                    SCHEDULED_SECTIONS, TENSOR_AXIS, CheckpointConfig, DataConfig, EvalConfig, LmEvalConfig, LoraConfig, LossConfig, MeshConfig, ModelConfig,
                                    RopeScaling, RunConfig, SamplerConfig, SelfPlayConfig, TeacherConfig, ToyConfig, TrackingConfig,
                                    TrainConfig, WandbConfig,
                                    at_iteration, check_batch_sizes, check_choice, check_split, dump, load, parse_scheduled,
                                    positive, with_overrides)

__all__ = ["ARCHITECTURES", "ATTENTION", "BATCH_AXES", "DTYPES", "KNOWN_TRUTH_SOURCES", "MESH_AXES", "PROMPT_FORMATS", "REMAT_POLICIES", "SCHEDULED_SECTIONS", "TENSOR_AXIS",
           "CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig", "LmEvalConfig", "LoraConfig", "LossConfig", "MeshConfig", "ModelConfig", "RopeScaling",
           "RunConfig", "SamplerConfig", "SelfPlayConfig", "TeacherConfig", "ToyConfig", "TrackingConfig", "TrainConfig", "WandbConfig", "at_iteration",
           "check_batch_sizes", "check_choice", "check_split", "differences", "dump", "from_dict", "load", "parse_scheduled",
           "positive", "to_dict", "with_overrides"]
