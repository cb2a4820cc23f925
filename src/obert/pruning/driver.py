"""One-shot pruning of a model: score, choose the pruned groups, update weights, keep masks.

With ``num_recomputations = R`` the target is reached in R sub-steps with sparsities
``s0 + (s - s0) * r / R`` (r = 1..R, ``s0`` the sparsity of the masks pruning starts from: 0
for a dense model), each re-estimating the scores (for oBERT: fresh gradients and Fisher)
on the model pruned so far.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from obert.errors import ObertError
from obert.model.heads import labelled_positions_only
from obert.model.masks import MaskSet
from obert.core.obs import nm_patterns
from obert.pruning.fisher import batch_stream, task_loss
from obert.pruning.methods import METHODS, Method, PruneConfig
from obert.pruning.settings import nm_of
from obert.model.targets import Target


def select_groups(scores: dict[str, Tensor], sparsity: float, scope: str) -> dict[str, Tensor]:
    """Which groups to prune (True) so that ``round(sparsity * n)`` groups are pruned.

    ``global``: the lowest scores over all layers together; ``uniform``: the lowest scores in
    each layer, ``round(sparsity * n_layer)`` per layer. Groups scored ``-inf`` (already pruned)
    go first, so masks only grow.
    """
    if scope == "uniform":
        return {name: select_groups({name: s}, sparsity, "global")[name] for name, s in scores.items()}
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float().cpu() for n in names])
    k = max(round(sparsity * flat.numel()), int(torch.isneginf(flat).sum()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    if k:
        chosen[torch.topk(flat, k, largest=False, sorted=False).indices] = True
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = chosen[start:start + size].to(scores[n].device)
        start += size
    return out


def choose_pruned(method: Method, model: nn.Module, targets: list[Target], masks: MaskSet,
                  loader_factory, step: int, target: float, config: PruneConfig) -> dict[str, Tensor]:
    """Per target, the weights to prune (True) to reach ``target``: the lowest-scored groups
    (``select_groups``), or for N:M the best pattern of every group; weights pruned before
    (possibly inside groups that stay) are constrained to zero too, except those the method may
    bring back (``Method.regrowable``), which compete on their scores."""
    g = config.group_size
    nm = nm_of(config.structure)
    stay = {}  # per target: the pruned weights that stay pruned
    for t in targets:
        back = method.regrowable(t)
        stay[t.name] = ~masks.masks[t.name] if back is None else ~masks.masks[t.name] & ~back.bool()
    if nm is not None:  # exactly k of every M weights, by the best pattern of each group
        patterns = nm_patterns(nm[1], round(target * nm[1]))
        pscores = method.pattern_scores(model, targets, masks, loader_factory, step, patterns)
        chosen = {t.name: choose_patterns(pscores[t.name], stay[t.name].reshape(-1, g),
                                          patterns.to(pscores[t.name].device), t.name)
                  for t in targets}
    else:
        scores = method.scores(model, targets, masks, loader_factory, step=step)
        for t in targets:  # already-pruned groups stay pruned
            kept = (~stay[t.name]).reshape(-1, g).any(1).to(scores[t.name].device)
            scores[t.name] = scores[t.name].float().masked_fill(~kept, float("-inf"))
        chosen = {n: c.repeat_interleave(g) for n, c in
                  select_groups(scores, target, config.scope).items()}
    return {t.name: chosen[t.name].reshape(t.module.weight.shape).to(t.module.weight.device)
            | stay[t.name] for t in targets}


@torch.no_grad()
def heldout_loss(model: nn.Module, batches: list[dict]) -> float:
    """Mean task loss of ``model`` (dropout off) over ``batches``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        losses = [float(task_loss(model, b, device)) for b in batches]
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)


def output_log_probs(model: nn.Module, batches: list[dict]) -> list[list[Tensor]]:
    """Per batch, the log-softmax of every ``*logits`` output of ``model`` (dropout off), rows
    ``[N, C]``: for token-level outputs (logits shaped like the labels plus classes) only the
    positions with a label (not -100), so a masked LM keeps its masked tokens, not 30k-way
    distributions at every position; start/end logits of QA are one distribution per example."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        with torch.no_grad():
            for b in batches:
                b = {k: v.to(device) for k, v in b.items()}
                with labelled_positions_only(model):  # a masked LM: the head at the masked tokens
                    res = model(**b)
                labels = b.get("labels")
                rows = []
                for name in sorted(k for k in res.keys() if k.endswith("logits")):
                    logits = res[name].to(torch.promote_types(res[name].dtype, torch.float32))
                    if labels is not None and labels.shape == logits.shape[:-1]:
                        logits = logits[labels != -100]
                    rows.append(torch.log_softmax(logits.reshape(-1, logits.shape[-1]), -1))
                out.append(rows)
    finally:
        model.train(was_training)
    return out


def divergence(reference: list[list[Tensor]], other: list[list[Tensor]]) -> float:
    """Mean ``KL(p_ref || p)`` over the rows of ``output_log_probs`` results."""
    total, rows = 0.0, 0
    for ref_b, b in zip(reference, other):
        for r, o in zip(ref_b, b):
            total += float((r.exp() * (r - o)).sum())
            rows += r.shape[0]
    return total / max(rows, 1)


def choose_damping(method: Method, model: nn.Module, targets: list[Target], masks: MaskSet,
                   loader_factory, step: int, target: float, config: PruneConfig,
                   log: Callable[[str], None]) -> dict:
    """Try each of ``method.damping_candidates()`` on this step: prune to ``target`` with it,
    score the result on ``auto_batches`` mini-batches drawn with another seed than the Fisher's,
    restore the weights; then ``use_damping`` the best. The score (``auto_criterion``): ``kl``,
    the divergence of the pruned model's predictions from the model's before this step
    (what the OBS update preserves, label-free, compared example by example), or ``loss``, the
    task loss. Returns what to record (the choice and every candidate's score)."""
    n = getattr(method.options, "auto_batches", 4)
    criterion = getattr(method.options, "auto_criterion", "kl")
    batches = list(batch_stream(loader_factory, n, config.seed + 7919 * step + 104_729))
    reference = output_log_probs(model, batches) if criterion == "kl" else None
    saved = {t.name: t.module.weight.detach().clone() for t in targets}
    scores = {}
    method.trial = True
    try:
        for damping in method.damping_candidates():
            method.use_damping(damping)
            method.update(targets, choose_pruned(method, model, targets, masks, loader_factory,
                                                 step, target, config))
            scores[damping] = divergence(reference, output_log_probs(model, batches)) \
                if reference is not None else heldout_loss(model, batches)
            with torch.no_grad():
                for t in targets:
                    t.module.weight.copy_(saved[t.name])
        scale = method.damping_scale()
    finally:
        method.trial = False
    best = min(scores, key=lambda d: (scores[d], d))
    method.use_damping(best)
    absolute = f" = {best * scale:.3g}" if scale else ""
    log(f"[obert] --damp auto: {best:g} x mean Fisher diagonal{absolute} (held-out {criterion} "
        + ", ".join(f"{d:g}: {v:.4f}" for d, v in scores.items()) + ")")
    return {"damping": best, "damping_absolute": best * scale if scale else None,
            "damping_criterion": criterion, "damping_losses": {f"{d:g}": v for d, v in scores.items()}}


def choose_patterns(scores: Tensor, pruned_before: Tensor, patterns: Tensor, name: str) -> Tensor:
    """Per group, the lowest-scored pattern that prunes every weight pruned before (masks only
    grow): ``scores`` ``[G, P]``, ``pruned_before`` ``[G, M]``, ``patterns`` ``[P, M]``; returns
    the per-weight prune mask, flat ``[G * M]``."""
    allowed = ~(pruned_before.to(scores.device).unsqueeze(1) & ~patterns.unsqueeze(0)).any(-1)
    if not bool(allowed.any(1).all()):
        k = int(patterns[0].sum())
        raise ObertError(f"{name} has groups of {patterns.shape[1]} with more than {k} weights "
                         "pruned already: an N:M structure cannot keep them pruned")
    best = scores.double().masked_fill(~allowed, float("inf")).argmin(1)
    return patterns[best].reshape(-1)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (GiB); 0 where the platform does not say
    (``resource`` is POSIX only, and reports KiB on Linux but bytes on macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**3 if sys.platform == "darwin" else peak / 1024**2


@dataclass
class PruneReport:
    """What a pruning run did: sparsity reached, time per phase, peak memory."""

    config: dict
    steps: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_gib: float = 0.0


def prune_model(model: nn.Module, targets: list[Target], config: PruneConfig,
                loader_factory: Callable[[int], Iterator] | None = None,
                masks: MaskSet | None = None, log: Callable[[str], None] = print,
                method: Method | None = None) -> tuple[MaskSet, PruneReport]:
    """Prune ``targets`` of ``model`` in place to ``config.sparsity``; returns masks and a report.

    ``loader_factory(seed)`` yields training mini-batches (for methods that need gradients).
    Existing ``masks`` are respected: their pruned weights stay pruned (unless the method may
    bring them back: ``Method.regrowable``). ``method``: an instance
    to prune with (a gradual run keeps one; it then prunes with this ``config``), else a new one
    of ``config.method``.
    """
    method_given = method
    if method is None:
        if METHODS[config.method].gradual_only:
            raise ObertError(f"{config.method} learns its scores while training: use it for "
                             "gradual pruning (a recipe's pruning section), not one-shot")
        method = METHODS[config.method](config)
    else:
        method.config = config
    if method.needs_gradients and loader_factory is None:
        raise ObertError(f"{config.method} needs training batches for its gradients")
    g = config.group_size
    nm = nm_of(config.structure)
    if nm is not None and method_given is None and \
            abs(config.sparsity * nm[1] - round(config.sparsity * nm[1])) > 1e-6:
        raise ObertError(f"--sparsity with {config.structure} is a number of pruned weights in "
                         f"every {nm[1]}: one of " +
                         ", ".join(f"{k / nm[1]:g}" for k in range(1, nm[1] - nm[0] + 1)))
    for t in targets:
        if t.module.weight.shape[-1] % g:
            raise ObertError(f"{t.name}: input size {t.module.weight.shape[-1]} is not a multiple "
                             f"of the {config.structure} group size {g}")
    if masks is None:
        masks = MaskSet.from_zeros(targets)
    report = PruneReport(config=config.as_dict())
    before = method.timings()
    t_start = time.perf_counter()
    start = masks.stats()["global_sparsity"]  # gradual pruning continues from earlier masks
    for r in range(1, config.num_recomputations + 1):
        target = start + (config.sparsity - start) * r / config.num_recomputations
        if nm is not None:
            target = round(target * nm[1]) / nm[1]
        step_info = {}
        if method.damping_candidates():
            step_info = choose_damping(method, model, targets, masks, loader_factory, r - 1, target,
                                       config, log)
        prune = choose_pruned(method, model, targets, masks, loader_factory, r - 1, target, config)
        method.update(targets, prune)
        for t in targets:
            masks.set(t.name, ~prune[t.name])
        masks.apply()
        for t in targets:  # a singular Fisher or NaN gradients must not end in a saved model
            if not bool(torch.isfinite(t.module.weight).all()):
                raise ObertError(f"pruning step {r} left non-finite weights in {t.name} (NaN "
                                 "gradients or a singular Fisher: check the model, raise --damp)")
        stats = masks.stats()
        report.steps.append({"step": r, "target_sparsity": target,
                             "sparsity": stats["global_sparsity"], **step_info})
        log(f"[obert] step {r}/{config.num_recomputations}: sparsity {stats['global_sparsity']:.4f} "
            f"(target {target:.4f})")
    report.timings = {**{k: v - before.get(k, 0.0) for k, v in method.timings().items()},
                      "total_seconds": time.perf_counter() - t_start}
    report.peak_rss_gib = peak_rss_gib()
    return masks, report
