"""Architecture search over a trained supernet: SPOS' evolution and random search with the same
number of evaluations (Guo et al., "Single Path One-Shot Neural Architecture Search with Uniform
Sampling", ECCV 2020; the authors' ``search.py``, github.com/megvii-model/SinglePathOneShot).

Pure functions over any candidate representation: the caller gives ``sample(rng)`` (a uniformly
random candidate), ``mutate(c, prob, rng)``, ``crossover(a, b, rng)``, ``key(c)`` (a hashable
identity, e.g. the genotype string: a candidate is evaluated once) and ``fitness(c)`` (higher is
better). SPOS' loop, per generation:

1. evaluate every new candidate of the population;
2. keep the ``top_k`` best of everything evaluated so far as parents;
3. ``n_mutation`` children: a random parent with every choice redrawn with ``mutation_prob``;
   ``n_crossover`` children: every choice from one of two random parents; only unseen ones;
4. fill up to ``population`` with random candidates.

The best fitness of a generation is the best of everything evaluated so far, so it never
decreases. Defaults are the paper's: population 50, 20 generations, top 10, 25 + 25 children,
mutation probability 0.1 (1000 evaluations).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field


@dataclass
class SearchResult:
    best: object  # the best candidate
    best_fitness: float
    history: list[dict] = field(default_factory=list)  # per generation: best/mean fitness, counts
    evaluated: dict = field(default_factory=dict)  # key -> fitness, every distinct candidate once


def _unseen(make: Callable, key: Callable, seen: set, tries: int):
    """A candidate from ``make()`` whose key is not in ``seen`` (None after ``tries`` failures)."""
    for _ in range(tries):
        c = make()
        if key(c) not in seen:
            seen.add(key(c))
            return c
    return None


def evolution_search(
    sample: Callable, mutate: Callable, crossover: Callable, key: Callable[[object], Hashable],
    fitness: Callable[[object], float], population: int = 50, generations: int = 20, top_k: int = 10,
    n_mutation: int = 25, n_crossover: int = 25, mutation_prob: float = 0.1, seed: int = 0,
    max_tries: int = 100, on_generation: Callable[[dict], None] | None = None,
) -> SearchResult:  # fmt: skip
    """SPOS' evolutionary search (see the module docstring); ``on_generation(row)`` after each."""
    if min(population, generations, top_k) < 1 or n_mutation < 0 or n_crossover < 0:
        raise ValueError("evolution needs population, generations, top_k >= 1 and n_mutation, n_crossover >= 0")
    if n_mutation + n_crossover > population:
        raise ValueError(f"n_mutation + n_crossover = {n_mutation + n_crossover} exceeds the population ({population})")
    rng = random.Random(seed)
    seen: set = set()
    scored: dict[Hashable, tuple[float, object]] = {}
    candidates = [c for c in (_unseen(lambda: sample(rng), key, seen, max_tries) for _ in range(population)) if c is not None]
    history = []
    for generation in range(generations):
        for c in candidates:
            scored[key(c)] = (float(fitness(c)), c)
        ranked = sorted(scored.values(), key=lambda fc: -fc[0])  # stable: ties keep evaluation order
        parents = [c for _, c in ranked[:top_k]]
        fits = [scored[key(c)][0] for c in candidates]
        row = {"generation": generation, "best_fitness": ranked[0][0], "mean_fitness": sum(fits) / max(1, len(fits)),
               "evaluated": len(candidates), "total_evaluated": len(scored), "best": key(ranked[0][1])}  # fmt: skip
        history.append(row)
        if on_generation is not None:
            on_generation(row)
        if generation == generations - 1:
            break
        children = []
        for n, make in ((n_mutation, lambda p=parents: mutate(rng.choice(p), mutation_prob, rng)),
                        (n_crossover, lambda p=parents: crossover(rng.choice(p), rng.choice(p), rng))):  # fmt: skip
            children += [c for c in (_unseen(make, key, seen, max_tries) for _ in range(n)) if c is not None]
        fill = [_unseen(lambda: sample(rng), key, seen, max_tries) for _ in range(population - len(children))]
        candidates = children + [c for c in fill if c is not None]
    best_fitness, best = max(scored.values(), key=lambda fc: fc[0])
    return SearchResult(best, best_fitness, history, {k: f for k, (f, _) in scored.items()})


def random_search(
    sample: Callable, key: Callable[[object], Hashable], fitness: Callable[[object], float], evaluations: int,
    per_generation: int | None = None, seed: int = 0, max_tries: int = 100,
    on_generation: Callable[[dict], None] | None = None,
) -> SearchResult:  # fmt: skip
    """``evaluations`` distinct random candidates (fewer only if the space has fewer), scored in
    rounds of ``per_generation`` so its history lines up with evolution's generations."""
    if evaluations < 1:
        raise ValueError(f"random search needs evaluations >= 1, got {evaluations}")
    rng, seen, scored, history = random.Random(seed), set(), {}, []
    per_generation = per_generation or evaluations
    best = None
    for generation, start in enumerate(range(0, evaluations, per_generation)):
        batch = [_unseen(lambda: sample(rng), key, seen, max_tries) for _ in range(min(per_generation, evaluations - start))]
        batch = [c for c in batch if c is not None]
        fits = []
        for c in batch:
            f = float(fitness(c))
            scored[key(c)] = f
            fits.append(f)
            if best is None or f > best[0]:
                best = (f, c)
        if best is None:
            break
        row = {"generation": generation, "best_fitness": best[0], "mean_fitness": sum(fits) / max(1, len(fits)),
               "evaluated": len(batch), "total_evaluated": len(scored), "best": key(best[1])}  # fmt: skip
        history.append(row)
        if on_generation is not None:
            on_generation(row)
    return SearchResult(best[1], best[0], history, scored)
