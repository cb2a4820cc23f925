"""Loading models and tokenizers from a hub id or a local directory, checked before any work.

* A path that looks local (``./x``, ``/x``, ``~/x``, or not a valid hub id) must exist; a local
  directory must hold ``config.json``.
* What a checkpoint *is* comes from its config (``architectures``): a sequence classifier, an
  extractive-QA model, a bare or pre-training encoder (BERT's masked LM), a decoder / causal LM,
  or something else. Commands state which kinds they take (``require_kind``) instead of letting
  ``AutoModelFor...`` silently bolt a random head onto whatever it is given.
* Weights load from safetensors only (a ``.bin`` checkpoint is a pickle, which runs code when
  loaded) and never with ``trust_remote_code``.
* A tokenizer must really be there: a local model directory without tokenizer files is an error
  unless another tokenizer is named (Transformers would otherwise build one with only the
  special tokens, mapping every word to ``[UNK]``).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from pathlib import Path

from obert.errors import ObertError, first_line

CLASSIFIER, QA, ENCODER, DECODER, OTHER = ("a sequence classifier", "a question-answering model",
                                           "an encoder", "a decoder (causal LM)",
                                           "another kind of model")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model", "sentencepiece.model")
# Models whose position ids start after the padding index (RoBERTa's scheme).
_PADDED_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod",
                     "roberta-prelayernorm", "ibert", "mpnet", "luke", "mluke", "xlm-roberta-xl"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@contextlib.contextmanager
def quiet_libraries(datasets: bool = False) -> Iterator[None]:
    """Transformers' and the hub client's loading chatter (and with ``datasets``, the datasets
    library's) off while the block runs: obert reports problems itself, as one line. Their
    verbosity and progress-bar settings are restored afterwards (a library call must not change
    the caller's logging)."""
    from transformers.utils import logging as hf_logging

    restore = [functools.partial(hf_logging.set_verbosity, hf_logging.get_verbosity())]
    if hf_logging.is_progress_bar_enabled():
        restore.append(hf_logging.enable_progress_bar)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:  # the hub client logs every retry of an unreachable hub: the error line says it once
        from huggingface_hub.utils import logging as hub_logging

        restore.append(functools.partial(hub_logging.set_verbosity, hub_logging.get_verbosity()))
        hub_logging.set_verbosity_error()
    except ImportError:
        pass
    if datasets:
        import datasets as ds

        restore.append(functools.partial(ds.logging.set_verbosity, ds.logging.get_verbosity()))
        if ds.is_progress_bar_enabled():
            restore.append(ds.enable_progress_bars)
        ds.logging.set_verbosity(ds.logging.CRITICAL)
        ds.disable_progress_bars()
    try:
        yield
    finally:
        for undo in reversed(restore):
            undo()


def resolve(path: str, what: str = "model") -> str:
    """``path`` as given when it is a local model directory or a plausible hub id; else an error."""
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ObertError(f"{what} '{path}' is a file: give a model directory or a hub id")
        if what != "tokenizer" and not (p / "config.json").is_file():
            raise ObertError(f"{what} directory '{path}' has no config.json (not a Hugging Face model)")
        return str(p)
    if path.startswith((".", "/", "~")) or "\\" in path or ".." in path or not _HUB_ID.fullmatch(path):
        raise ObertError(f"{what} directory not found: {path}")
    return path


def load_config(path: str, what: str = "model"):
    """The model's config (hub id or directory), or a one-line error."""
    from transformers import AutoConfig

    path = resolve(path, what)
    try:
        with quiet_libraries():
            return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except KeyError as exc:  # Transformers' config registry has no such model type
        raise ObertError(f"cannot load {what} '{path}': unknown model type {exc} in its "
                         "config.json (not one this Transformers version knows)") from exc
    except (OSError, ValueError) as exc:
        raise ObertError(f"cannot load {what} '{path}': {_not_local(path)}{first_line(exc)}") from exc


def _not_local(path: str) -> str:
    return "" if Path(path).exists() else "not a local directory, and from the hub: "


def model_kind(config) -> str:
    """What the checkpoint is, from ``config.architectures`` (and the model type when bare)."""
    from transformers.models.auto import modeling_auto as auto

    arch = (config.architectures or [""])[0]
    if arch in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values():
        return CLASSIFIER
    if arch in auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES.values():
        return QA
    encoder_type = config.model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and \
        config.model_type not in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    if arch in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or getattr(config, "is_decoder", False):
        return DECODER
    bare = {auto.MODEL_MAPPING_NAMES.get(config.model_type), auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES.get(config.model_type),
            auto.MODEL_FOR_PRETRAINING_MAPPING_NAMES.get(config.model_type)}
    if arch == "" or arch in bare:
        return ENCODER if encoder_type else DECODER
    return OTHER


def require_kind(config, path: str, allowed: tuple[str, ...], command: str, hint: str = "") -> str:
    """The model's kind, or a one-line error when ``command`` cannot take it."""
    kind = model_kind(config)
    if kind not in allowed:
        arch = (config.architectures or [config.model_type])[0]
        raise ObertError(f"'{path}' is {kind} ({arch}); {command} takes "
                         f"{' or '.join(allowed)}{hint}")
    return kind


def max_positions(config, tokenizer=None) -> int | None:
    """Longest input (tokens) the model's position embeddings cover, where the config says."""
    n = getattr(config, "max_position_embeddings", None)
    if n is None:
        return None
    if config.model_type in _PADDED_POSITIONS:
        n -= (config.pad_token_id if config.pad_token_id is not None else 1) + 1
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < n:
        n = limit
    return n


def check_length(length: int | None, config, option: str, tokenizer=None, default: int = 128) -> int:
    """The token length to use: ``length`` if the model can take it (else a one-line error naming
    ``option``); when None, ``default`` or the model's limit if that is shorter."""
    limit = max_positions(config, tokenizer)
    if length is None:
        return default if limit is None else min(default, limit)
    if limit is not None and length > limit:
        raise ObertError(f"{option} {length} is longer than the model's {limit} positions")
    return length


def load_tokenizer(model_path: str, tokenizer: str | None = None, config=None):
    """The tokenizer of ``model_path`` (or the one named by ``tokenizer``), checked for a vocabulary."""
    from transformers import AutoTokenizer

    source = resolve(tokenizer, "tokenizer") if tokenizer else resolve(model_path)
    local = Path(source)
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise ObertError(f"'{source}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): "
                         "name one with --tokenizer (recipes: model.tokenizer), a hub id or a "
                         "directory")
    try:
        with quiet_libraries():
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ObertError(f"cannot load tokenizer '{source}': {_not_local(source)}"
                         f"{first_line(exc)}") from exc
    if len(tok) <= len(set(tok.all_special_tokens)):
        raise ObertError(f"tokenizer '{source}' has no vocabulary beyond its special tokens")
    vocab = getattr(config, "vocab_size", None) if config is not None else None
    if vocab is not None and len(tok) > vocab:
        raise ObertError(f"tokenizer '{source}' has {len(tok)} tokens but the model's embedding "
                         f"holds {vocab}: they do not belong together")
    return tok


def load_weights(cls, path: str, what: str = "model", **kwargs):
    """``cls.from_pretrained`` from safetensors only, without remote code; one-line errors."""
    path = resolve(path, what)
    local = Path(path)
    if local.is_dir() and not any(local.glob("*.safetensors")):
        pickles = [p.name for p in local.glob("*.bin")] + [p.name for p in local.glob("*.pt*")]
        found = f" (found {', '.join(sorted(pickles))}: pickle files, which run code when loaded)" \
            if pickles else ""
        raise ObertError(f"{what} '{path}' has no safetensors weights{found}; obert loads "
                         "safetensors only")
    try:
        with quiet_libraries():
            model = cls.from_pretrained(path, use_safetensors=True, trust_remote_code=False, **kwargs)
    except MemoryError:
        raise
    except Exception as exc:  # a truncated or mismatched checkpoint raises many types
        text = str(exc)
        if "mismatched" in text or "size mismatch" in text:
            reason = "its weights do not fit its config.json (tensor shapes differ)"
        elif "safetensors" in text:
            reason = (f"{first_line(exc)} (obert loads safetensors only: a .bin checkpoint is a "
                      "pickle, which runs code when loaded; convert it where you trust its source)")
        else:
            reason = first_line(exc)
        raise ObertError(f"cannot load {what} '{path}': {_not_local(path)}{reason}") from exc
    check_finite(model, f"{what} '{path}'")
    return model


def load_as_saved(path: str, allowed: tuple[str, ...], command: str):
    """The model at ``path`` as the class it was saved as (``config.architectures``: a masked LM
    stays a masked LM, a classifier keeps its head), when ``command`` takes its kind."""
    import transformers

    config = load_config(path)
    require_kind(config, path, allowed, command)
    arch = (config.architectures or [""])[0]
    cls = getattr(transformers, arch, None) if arch else None
    return load_weights(cls if isinstance(cls, type) else transformers.AutoModel, path)


def check_finite(model, what: str) -> None:
    """One-line error naming the first parameter holding NaN or infinity."""
    import torch

    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise ObertError(f"{what} has non-finite values (NaN or inf) in {name}")
