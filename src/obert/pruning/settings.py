"""The settings of pruning, defined once.

``PruneSettings`` holds what every pruning run shares (method, structure, scope, recomputations,
the gradient mini-batch size); each method adds its own settings as one typed model, its
``Method.Settings`` (oBERT: m, block size, damping, ...). ``PruneConfig`` (what ``prune_model``
takes) adds the target sparsity and a seed; a recipe's ``pruning`` section inherits the same
fields and adds its schedule. Both take the chosen method's settings flat, next to the shared ones,
and check them against the method's model: ``config.options`` is that model. The ``obert prune``
options, their help and their defaults are generated from these models (``obert.cli.main``).
"""

from __future__ import annotations

import typing

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from obert.errors import ObertError

# structure -> group size along the input dimension: pruned whole (block4), or N of every M
# consecutive weights kept (N:M semi-structured, the layout of GPU sparse tensor cores)
STRUCTURES = {"unstructured": 1, "block4": 4, "2:4": 4, "4:8": 8}


def nm_of(structure: str) -> tuple[int, int] | None:
    """``(N, M)`` of an N:M structure (N kept of every M), else None."""
    if ":" not in structure:
        return None
    n, m = structure.split(":")
    return int(n), int(m)


def either(choices) -> str:
    """``a, b or c``."""
    choices = list(choices)
    return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]


class Settings(BaseModel):
    """Base of every settings model: unknown fields are errors, NaN and infinity are refused
    (they pass range checks: nan > 0 is False, inf > 0 is True)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools_as_values(cls, value, info):
        """``num_grads: true`` would otherwise be read as 1."""
        if isinstance(value, bool) and bool not in field_types(cls.model_fields[info.field_name].annotation):
            raise ValueError("true/false is not a value for this field")
        return value


def field_types(annotation) -> tuple:
    """The types a field takes, None left out (``int | None`` -> ``(int,)``)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return tuple(args) or (annotation,)


class NoSettings(Settings):
    """The settings of a method that has none of its own."""


def registered_methods() -> dict:
    from obert.pruning.methods import METHODS  # registered after this module is defined

    return METHODS


class PruneSettings(Settings):
    """How to prune, for every method; the chosen method's own settings come flat next to these
    and are checked by its ``Settings`` model (``options``)."""

    model_config = ConfigDict(extra="allow")
    _options: BaseModel = PrivateAttr(default_factory=NoSettings)

    method: str = Field("obert", description="obert, woodfisher, mfac, magnitude, movement or soft-movement (or a "
                                              "method registered in obert.pruning.methods.METHODS)")
    structure: str = Field("unstructured", description="unstructured, block4 (4 consecutive input "
                                                       "weights) or N:M (2:4, 4:8: N of every M "
                                                       "consecutive input weights kept)")
    scope: str = Field("global", description="global (one threshold) or uniform (same sparsity per "
                                             "layer)")
    num_recomputations: int = Field(1, gt=0, description="Reach the target in R steps, re-estimating "
                                                         "the scores")
    grad_batch_size: int = Field(16, gt=0, description="Examples per gradient mini-batch (methods "
                                                       "that use gradients)")

    @field_validator("method", "structure", "scope")
    @classmethod
    def _one_of(cls, value: str, info) -> str:
        choices = {"method": registered_methods(), "structure": STRUCTURES,
                   "scope": ("global", "uniform")}[info.field_name]
        if value not in choices:
            raise ValueError(f"must be {either(choices)}, got '{value}'")
        return value

    @model_validator(mode="after")
    def _method_options(self):
        """The extra fields are the method's settings: check them with its model (errors keep
        the field's name), then hold them with their defaults filled in. Another registered
        method's setting is an error naming its owner, unless it is None (= not given)."""
        methods = registered_methods()
        model = methods[self.method].Settings
        given = {k: v for k, v in (self.__pydantic_extra__ or {}).items()
                 if v is not None or k in model.model_fields}
        problems = []
        for name, value in given.items():
            if name in model.model_fields:
                continue
            owners = [m for m, cls in methods.items() if name in cls.Settings.model_fields]
            kind = PydanticCustomError("foreign_setting", "is a setting of {owners}, not of "
                                       "{method}", {"owners": either(owners), "method": self.method}) \
                if owners else "extra_forbidden"
            problems.append(InitErrorDetails(type=kind, loc=(name,), input=value))
        if problems:  # also where the method's model would ignore unknown fields
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        self._options = model.model_validate(given, context={"structure": self.structure})
        self.__pydantic_extra__ = self._options.model_dump()
        return self

    def _given_options(self) -> dict:
        """The method's settings that were given (the rest are its defaults)."""
        return self._options.model_dump(include=self._options.model_fields_set)

    def model_copy(self, *, update: dict | None = None, deep: bool = False):
        """A copy with ``update`` applied and checked again (the method's defaults follow a new
        structure; a new method drops the old one's settings)."""
        update = dict(update or {})
        values = {name: getattr(self, name) for name in type(self).model_fields}
        if update.get("method", self.method) == self.method:
            values.update(self._given_options())
        return type(self)(**{**values, **update})

    def __setattr__(self, name: str, value) -> None:
        """A method setting assigned is checked by the method's model (as at construction)."""
        if not name.startswith("_") and name not in type(self).model_fields and \
                name in type(self._options).model_fields:
            options = type(self._options).model_validate({**self._given_options(), name: value},
                                                         context={"structure": self.structure})
            self._options = options
            self.__pydantic_extra__ = options.model_dump()
            return
        super().__setattr__(name, value)

    @property
    def options(self) -> BaseModel:
        """The method's own settings (its ``Settings`` model)."""
        return self._options

    @property
    def group_size(self) -> int:
        return STRUCTURES[self.structure]

    def prune_settings(self) -> dict:
        """The shared fields and the method's, flat (what ``PruneConfig`` takes)."""
        return {**{name: getattr(self, name) for name in PruneSettings.model_fields},
                **self._options.model_dump()}


def option_name(field: str) -> str:
    """The ``obert prune`` option of a settings field."""
    return "--max-memory" if field == "max_memory_gb" else "--" + field.replace("_", "-")


class PruneConfig(PruneSettings):
    """Settings of one pruning call: the shared settings, the method's own (flat: ``num_grads=``,
    ``damp=``, ... for oBERT), the target sparsity and a seed (defaults follow the oBERT paper
    where it gives them). Invalid values raise ``ObertError`` naming the ``obert prune`` option."""

    sparsity: float = Field(description="Target fraction of pruned weights, in [0, 1)")
    seed: int = Field(0, ge=0, lt=2**32, description="Seed of the gradient mini-batch order")

    @field_validator("sparsity", mode="before")
    @classmethod
    def _fraction(cls, value):
        """Before the type check, so NaN and infinity get this message too."""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value < 1:
            raise ValueError("must be in [0, 1)")
        return value

    @model_validator(mode="after")
    def _nm_sparsity(self):
        nm = nm_of(self.structure)
        if nm is not None and self.sparsity > 1 - nm[0] / nm[1] + 1e-9:
            raise ValueError(f"{self.structure} keeps {nm[0]} of every {nm[1]} weights: sparsity "
                             f"at most {1 - nm[0] / nm[1]:g}, got {self.sparsity:g}")
        return self

    def __init__(self, sparsity: float | None = None, /, **values) -> None:
        if sparsity is not None:
            values["sparsity"] = sparsity
        try:
            super().__init__(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else ""
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"is not a setting of {values.get('method', 'obert')}"
            if not field:  # a check of several settings together: its message says it all
                raise ObertError(msg) from None
            got = "" if "got " in msg or "input" not in err or err["type"] in (
                "extra_forbidden", "foreign_setting") else f", got {err['input']!r}"
            raise ObertError(f"{option_name(field)} {msg[:1].lower() + msg[1:]}{got}") from None

    def as_dict(self) -> dict:
        return self.model_dump()
