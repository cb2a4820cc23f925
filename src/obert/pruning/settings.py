"""The settings of pruning, defined once.

``MethodSettings`` holds what every pruning run shares (method, structure, scope and the Fisher's
m, batch, block size and damping, ...). ``PruneConfig`` (what ``prune_model`` takes) adds the
target sparsity and a seed; a recipe's ``pruning`` section inherits the same fields and adds its
schedule; the ``obert prune`` options, their help and their defaults are generated from the fields
(``obert.cli.main``). A method's own settings would be one more model of this kind.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from obert.errors import ObertError

STRUCTURES = {"unstructured": 1, "block4": 4}  # structure -> group size along the input dim
DEFAULT_BLOCK = {"unstructured": 50, "block4": 32}


def _either(choices) -> str:
    choices = list(choices)
    return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]


class MethodSettings(BaseModel):
    """How to prune: the method and its second-order estimate."""

    # NaN and infinity pass range checks (nan > 0 is False, inf > 0 is True): refuse them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: str = Field("obert", description="obert or magnitude (or a method registered in "
                                              "obert.pruning.methods.METHODS)")
    structure: str = Field("unstructured", description="unstructured or block4 (4 consecutive input "
                                                       "weights)")
    scope: str = Field("global", description="global (one threshold) or uniform (same sparsity per "
                                             "layer)")
    # 256: a quarter of the paper's 1024, four times cheaper on a CPU; recipes/ set their own.
    num_grads: int = Field(256, gt=0, description="m: mini-batch gradients for the Fisher (paper: 1024)")
    grad_batch_size: int = Field(16, gt=0, description="Examples per gradient mini-batch")
    fisher_block_size: int | None = Field(None, gt=0, description="B (default 50; 32 for block4)")
    damp: float = Field(1e-7, gt=0, description="Fisher damping lambda (absolute)")
    num_recomputations: int = Field(1, gt=0, description="Reach the target in R steps, re-estimating "
                                                         "the Fisher")
    update: str = Field("joint", description="joint (exact per-block OBS) or independent (paper)")
    max_memory_gb: float | None = Field(None, gt=0, description="GiB for Fisher blocks (default: 80% "
                                                                "of free)")

    @field_validator("method", "structure", "scope", "update")
    @classmethod
    def _one_of(cls, value: str, info) -> str:
        from obert.pruning.methods import METHODS  # the registered methods

        choices = {"method": METHODS, "structure": STRUCTURES, "scope": ("global", "uniform"),
                   "update": ("joint", "independent")}[info.field_name]
        if value not in choices:
            raise ValueError(f"must be {_either(choices)}, got '{value}'")
        return value

    @field_validator("fisher_block_size")
    @classmethod
    def _whole_groups(cls, value: int | None, info) -> int | None:
        group = STRUCTURES.get(info.data.get("structure"))  # absent when structure was refused
        if value is not None and group and value % group:
            raise ValueError(f"must be a positive multiple of the group size {group}, got {value}")
        return value

    @model_validator(mode="after")
    def _default_block_size(self):
        if self.fisher_block_size is None:
            self.fisher_block_size = DEFAULT_BLOCK[self.structure]
        return self

    @property
    def group_size(self) -> int:
        return STRUCTURES[self.structure]

    def method_settings(self) -> dict:
        """The ``MethodSettings`` fields of this model."""
        return {name: getattr(self, name) for name in MethodSettings.model_fields}


def option_name(field: str) -> str:
    """The ``obert prune`` option of a settings field."""
    return "--max-memory" if field == "max_memory_gb" else "--" + field.replace("_", "-")


class PruneConfig(MethodSettings):
    """Settings of one pruning call: the method's settings, the target sparsity and a seed
    (defaults follow the oBERT paper where it gives them). Invalid values raise ``ObertError``
    naming the ``obert prune`` option."""

    sparsity: float = Field(description="Target fraction of pruned weights, in [0, 1)")
    seed: int = Field(0, ge=0, lt=2**32, description="Seed of the gradient mini-batch order")

    @field_validator("sparsity", mode="before")
    @classmethod
    def _fraction(cls, value):
        """Before the type check, so NaN and infinity get this message too."""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value < 1:
            raise ValueError("must be in [0, 1)")
        return value

    def __init__(self, sparsity: float | None = None, /, **values) -> None:
        if sparsity is not None:
            values["sparsity"] = sparsity
        try:
            super().__init__(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else ""
            msg = err["msg"].removeprefix("Value error, ")
            got = "" if "got " in msg or "input" not in err else f", got {err['input']!r}"
            name = option_name(field) if field else "pruning settings"
            raise ObertError(f"{name} {msg[:1].lower() + msg[1:]}{got}") from None

    def as_dict(self) -> dict:
        return self.model_dump()
