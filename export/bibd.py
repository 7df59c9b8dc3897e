"""Balanced incomplete block designs: which input groups a grouped layer connects (EDDL).

A (v, k, lambda) design is ``b`` blocks of ``k`` of the ``v`` points such that every pair of
points lies together in exactly ``lambda`` blocks; then every point lies in ``r`` blocks. In a
BIBD layer the points are input channel groups and each block is one small convolution over
the groups it holds, so the layer costs ``k / v`` of a dense one and any two input groups still
meet in exactly one place (Chang et al., EDDL, GLOBECOM 2019).

- :func:`affine_plane` (order q = 2, 3, 4): q^2 points, q(q+1) lines of q points, lambda = 1,
  in q + 1 parallel classes (each class partitions the points). Order 4 is built over GF(4).
- :func:`fano_plane`: the (7, 3, 1) design.
- :func:`random_blocks`: the same number of blocks of the same size at random (seeded): the
  randomly sparse layer of the same density that a BIBD is measured against.
- :func:`partition_blocks`: blocks shared out over fog nodes, each needing as few input
  groups as possible.
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

import numpy as np

Block = tuple[int, ...]
DESIGNS = ("affine:2", "affine:3", "affine:4", "fano")

# GF(4) = {0, 1, a, a+1} as 0..3 (bit i: the coefficient of a^i); a^2 = a + 1. Addition is XOR.
_GF4_MUL = ((0, 0, 0, 0), (0, 1, 2, 3), (0, 2, 3, 1), (0, 3, 1, 2))


class DesignError(ValueError):
    """A block design breaks a BIBD rule; the message names the block, point or pair."""


@dataclass(frozen=True)
class Design:
    """A block design on points ``0..v-1``; ``name`` is how the CLI spells it."""

    name: str
    v: int
    k: int
    lam: int
    blocks: tuple[Block, ...]

    @property
    def b(self) -> int:
        return len(self.blocks)

    @property
    def r(self) -> int:
        return self.b * self.k // self.v

    @property
    def density(self) -> float:
        """Share of the (input group, block) connections a dense layer has that this one keeps."""
        return self.k / self.v


def _field(q: int) -> tuple[callable, callable]:
    if q == 4:
        return (lambda a, b: a ^ b), (lambda a, b: _GF4_MUL[a][b])
    if q in (2, 3):
        return (lambda a, b: (a + b) % q), (lambda a, b: (a * b) % q)
    raise DesignError(f"affine planes are built for orders 2, 3 and 4 (a prime or GF(4)), not {q}")


def affine_plane(q: int) -> Design:
    """AG(2, q): point (x, y) is ``x * q + y``; lines ``y = m x + c`` and ``x = c``, grouped in
    parallel classes (slope by slope, then the verticals)."""
    add, mul = _field(q)
    blocks: list[Block] = []
    for m in range(q):
        for c in range(q):
            blocks.append(tuple(sorted(x * q + add(mul(m, x), c) for x in range(q))))
    for c in range(q):
        blocks.append(tuple(c * q + y for y in range(q)))
    return Design(f"affine:{q}", q * q, q, 1, tuple(blocks))


def fano_plane() -> Design:
    """PG(2, 2): the translates of the difference set {0, 1, 3} modulo 7."""
    return Design("fano", 7, 3, 1, tuple(tuple(sorted((i + d) % 7 for d in (0, 1, 3))) for i in range(7)))


def design(name: str) -> Design:
    """``affine:2``, ``affine:3``, ``affine:4`` or ``fano``, checked."""
    if name == "fano":
        made = fano_plane()
    elif name.startswith("affine:") and name[7:].isdigit():
        made = affine_plane(int(name[7:]))
    else:
        raise DesignError(f"unknown design {name!r}; known: {', '.join(DESIGNS)}")
    check_design(made.blocks, made.v, made.k, made.lam)
    return made


def check_design(blocks, v: int, k: int, lam: int) -> int:
    """Check that ``blocks`` is a (v, k, lambda) BIBD and return r, the blocks per point.

    Raises :class:`DesignError` naming the first offending block, point or pair."""
    blocks = [tuple(block) for block in blocks]
    if not blocks:
        raise DesignError("a design needs at least one block")
    for i, block in enumerate(blocks):
        if len(block) != k:
            raise DesignError(f"block {i} {block} has {len(block)} points, not k = {k}")
        if len(set(block)) != k:
            raise DesignError(f"block {i} {block} repeats a point")
        bad = [p for p in block if not (isinstance(p, (int, np.integer)) and 0 <= p < v)]
        if bad:
            raise DesignError(f"block {i} {block} holds point {bad[0]!r}, outside 0..{v - 1}")
    per_point = Counter(p for block in blocks for p in block)
    r = len(blocks) * k // v
    for p in range(v):
        if per_point[p] != r or len(blocks) * k != r * v:
            raise DesignError(f"point {p} lies in {per_point[p]} blocks, not r = b k / v = {len(blocks) * k / v:g}")
    pairs = Counter(pair for block in blocks for pair in itertools.combinations(sorted(block), 2))
    for pair in itertools.combinations(range(v), 2):
        if pairs[pair] != lam:
            raise DesignError(f"pair {pair} lies together in {pairs[pair]} blocks, not lambda = {lam}")
    return r


def incidence(blocks, v: int) -> np.ndarray:
    """Bool ``[b, v]``: block i holds point j. As a mask over (output group, input group) it
    is the layer's connectivity."""
    out = np.zeros((len(blocks), v), bool)
    for i, block in enumerate(blocks):
        out[i, list(block)] = True
    return out


def random_blocks(v: int, b: int, k: int, seed: int) -> tuple[Block, ...]:
    """``b`` blocks of ``k`` distinct points drawn at random: the same density as a (v, k) BIBD
    with ``b`` blocks, without its balance (some pairs never meet, some meet often)."""
    rng = np.random.default_rng(seed)
    return tuple(tuple(sorted(int(p) for p in rng.choice(v, size=k, replace=False))) for _ in range(b))


def partition_blocks(blocks, nodes: int, *, rounds: int = 200) -> list[list[int]]:
    """Share block indices out over ``nodes`` (as even as the count allows) so that each node
    needs few input groups: greedy, then pairwise swaps while the summed slices shrink.

    A node's input slice is the union of its blocks' points; the sum over nodes is what the
    gateway sends per event, in input groups."""
    blocks = [tuple(b) for b in blocks]
    if not 1 <= nodes <= len(blocks):
        raise DesignError(f"{len(blocks)} blocks cannot be shared over {nodes} nodes")
    sizes = [len(part) for part in np.array_split(np.arange(len(blocks)), nodes)]
    parts: list[list[int]] = [[] for _ in range(nodes)]
    for i, block in enumerate(blocks):
        free = [n for n in range(nodes) if len(parts[n]) < sizes[n]]
        parts[min(free, key=lambda n: (len(_union(blocks, parts[n]) | set(block)), len(parts[n])))].append(i)

    def cost(ps) -> int:
        return sum(len(_union(blocks, p)) for p in ps)

    best = cost(parts)
    for _ in range(rounds):
        improved = False
        for a, b in itertools.combinations(range(nodes), 2):
            for i, j in itertools.product(range(len(parts[a])), range(len(parts[b]))):
                parts[a][i], parts[b][j] = parts[b][j], parts[a][i]
                now = cost(parts)
                if now < best:
                    best, improved = now, True
                else:
                    parts[a][i], parts[b][j] = parts[b][j], parts[a][i]
        if not improved:
            break
    return [sorted(p) for p in parts]


def _union(blocks, indices) -> set[int]:
    return {p for i in indices for p in blocks[i]}


def split_sizes(total: int, parts: int) -> list[int]:
    """``total`` channels over ``parts`` groups, as even as possible (larger groups first)."""
    if total < parts:
        raise DesignError(f"{total} channels cannot make {parts} non-empty groups")
    return [len(p) for p in np.array_split(np.arange(total), parts)]
