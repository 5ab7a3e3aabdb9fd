"""Pipeline config: one YAML file, validated by pydantic; errors name the offending key.

Each stage owns its config model (``tasks/<stage>.py``); this module only composes them, so a
stage's cache key depends on its own section and never on another stage's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storage.errors import ConfigError
from tasks.benchmark import BenchConfig
from tasks.filter import FilterConfig
from tasks.generate import GenerateConfig
from tasks.models import TargetConfig
from tasks.prompts import PromptsConfig
from tasks.train import TrainConfig

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"
STAGES = ("target", "prompts", "generate", "filter", "train", "benchmark", "report")
# What each stage reads: forcing a stage rebuilds it and everything downstream of it.
DOWNSTREAM = {
    "target": STAGES[0:],
    "prompts": STAGES[1:],
    "generate": STAGES[2:],
    "filter": STAGES[3:],
    "train": STAGES[4:],
    "benchmark": STAGES[5:],
    "report": STAGES[6:],
}


class RunnerConfig(BaseModel):
    """How generation shards fan out: threads by default, a Dask cluster when an address is set."""

    model_config = ConfigDict(extra="forbid")
    dask_address: str | None = Field(None, description="tcp://host:8786 of a Dask scheduler")
    max_workers: int | None = Field(
        None, ge=1, description="thread workers for shard tasks; None: as many shards as the "
        "generate section keeps in flight (1 for hf, enough to fill every server for openai)")


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "default"
    store: str | None = Field(None, description="store URL; --store and $DFLASH_STORE override it")
    target: TargetConfig = Field(default_factory=TargetConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    benchmark: BenchConfig = Field(default_factory=BenchConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None
                ) -> PipelineConfig:
    """Read and validate a YAML config; ``overrides`` are dotted keys (``generate.seed``)."""
    p = Path(path) if path else DEFAULT_CONFIG
    if not p.is_file() and not p.is_absolute() and (REPO / p).is_file():
        p = REPO / p  # repo-relative, as deployments name them, from any working directory
    if not p.is_file():
        raise ConfigError(f"config {p}: file not found; pass --config PATH "
                          f"(examples in {REPO / 'configs'})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {p}: top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"]) or "(top level)"
        more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise ConfigError(f"config {p}: key {key!r}: {err['msg']}{more}") from None
