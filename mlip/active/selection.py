"""Which explored structures to label: uncertain ones, spread out (METHODS.md §6.1).

Candidates are the structures whose score (the largest force σ over the atoms, eV/Å)
lies between ``sigma_low`` (already known) and ``sigma_high`` (probably unphysical: the
trajectory has left the trusted region). From them a batch is picked greedily by
farthest-point sampling in the model's own feature space (mean invariant node
features), starting from the most uncertain candidate, with each distance weighted
by the candidate's σ (argmax σ_x · min distance to the picked and to the training set),
so the batch is uncertain and not a run of near-duplicates of one MD stretch.

`select_balanced` shares the batch evenly among groups of snapshots (the exploration's
temperatures), each share picked as above within its group, as DP-GEN caps the
candidates per system: by σ alone, every label goes to the hottest trajectory, whose
snapshots are always the most uncertain, and the conditions the user also asked to
explore get none (docs/benchmarks.md, active learning on n-butane).

When every explored structure is above ``sigma_high`` (a young model is unsure
everywhere, and its MD leaves the trusted region early), `edge_of_trust` picks the least
uncertain of them instead, spread out the same way: where the model first goes wrong.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def candidate_mask(scores: np.ndarray, sigma_low: float, sigma_high: float) -> np.ndarray:
    """[n] True where sigma_low < score <= sigma_high."""
    scores = np.asarray(scores, np.float64)
    return (scores > sigma_low) & (scores <= sigma_high)


def select_batch(scores: np.ndarray, features: np.ndarray, count: int, sigma_low: float, sigma_high: float,
                 known_features: Optional[np.ndarray] = None, diversity: bool = True) -> list[int]:
    """Indices of at most ``count`` candidates to label, most uncertain first.

    Args:
        scores: [n] uncertainty of each explored structure.
        features: [n, d] its descriptor.
        known_features: [m, d] descriptors of the structures already labelled: a candidate
            close to one of them counts as close to a picked one.
        diversity: False picks the ``count`` most uncertain candidates.
    """
    scores = np.asarray(scores, np.float64)
    candidates = np.flatnonzero(candidate_mask(scores, sigma_low, sigma_high))
    if count <= 0 or candidates.size == 0:
        return []
    if not diversity:
        return candidates[np.argsort(-scores[candidates], kind="stable")][:count].tolist()
    features = np.asarray(features, np.float64)
    scale = np.std(features[candidates], axis=0).mean() or 1.0  # distances in units of the spread
    distance = np.full(candidates.size, np.inf)
    if known_features is not None and len(known_features):
        known = np.asarray(known_features, np.float64)
        distance = np.min(np.linalg.norm(features[candidates, None, :] - known[None], axis=-1), axis=1) / scale
    picked: list[int] = []
    for _ in range(min(count, candidates.size)):
        if np.all(np.isinf(distance)):  # nothing picked or known yet: the most uncertain
            position = int(np.argmax(scores[candidates]))
        else:
            weighted = scores[candidates] * distance
            weighted[[candidates.tolist().index(p) for p in picked]] = -np.inf
            position = int(np.argmax(weighted))
        picked.append(int(candidates[position]))
        distance = np.minimum(distance, np.linalg.norm(features[candidates] - features[candidates[position]],
                                                       axis=-1) / scale)
    return picked


def select_balanced(groups, scores: np.ndarray, features: np.ndarray, count: int, sigma_low: float,
                    sigma_high: float, known_features: Optional[np.ndarray] = None,
                    diversity: bool = True) -> list[int]:
    """`select_batch` with the batch shared evenly among ``groups`` ([n] a label per structure).

    Each round, each group still open gets ceil(left / open groups) picks, in the order the groups
    first appear; a group with fewer candidates than its share closes, and what it leaves
    passes to the others. Picks of earlier groups count as known for the diversity of later ones.
    """
    groups = np.asarray(groups)
    scores, features = np.asarray(scores, np.float64), np.asarray(features, np.float64)
    known = (np.zeros((0, features.shape[1])) if known_features is None or not len(known_features)
             else np.asarray(known_features, np.float64))
    picked: list[int] = []
    open_groups = list(dict.fromkeys(groups.tolist()))
    while len(picked) < count and open_groups:
        still_open = []
        quota = -(-(count - len(picked)) // len(open_groups))  # this round's share of each group
        for group in open_groups:
            share = min(quota, count - len(picked))
            if share <= 0:
                still_open.append(group)
                continue
            members = np.array([i for i in np.flatnonzero(groups == group) if i not in picked], dtype=int)
            chosen = [] if members.size == 0 else select_batch(
                scores[members], features[members], share, sigma_low, sigma_high,
                np.concatenate([known, features[picked]]) if picked else known, diversity)
            picked += members[chosen].tolist()
            if len(chosen) == share:
                still_open.append(group)
        open_groups = still_open
    return picked


def edge_of_trust(scores: np.ndarray, features: np.ndarray, count: int, sigma_high: float,
                  known_features: Optional[np.ndarray] = None, diversity: bool = True) -> list[int]:
    """Indices of at most ``count`` structures above ``sigma_high``, the least uncertain first.

    From the 2·``count`` least uncertain structures above the window, farthest-point
    sampling (unweighted) picks ``count``, so they are not all one trajectory's first steps.
    """
    scores = np.asarray(scores, np.float64)
    above = np.flatnonzero(scores > sigma_high)
    if count <= 0 or above.size == 0:
        return []
    nearest = above[np.argsort(scores[above], kind="stable")][:2 * count]
    if not diversity:
        return nearest[:count].tolist()
    chosen = select_batch(np.ones(nearest.size), np.asarray(features)[nearest], count, 0.0, 1.0, known_features)
    return nearest[chosen].tolist()
