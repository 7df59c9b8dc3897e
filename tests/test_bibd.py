"""Block designs: the constructions, the checker on valid and invalid designs, the partition."""
from __future__ import annotations

import itertools

import pytest

from fogsplit.export.bibd import DESIGNS, DesignError, affine_plane, check_design, design, fano_plane, incidence, \
    partition_blocks, random_blocks, split_sizes


@pytest.mark.parametrize("q", [2, 3, 4])
def test_affine_planes_are_bibds(q):
    d = affine_plane(q)
    assert (d.v, d.b, d.k, d.lam) == (q * q, q * (q + 1), q, 1)
    assert check_design(d.blocks, d.v, d.k, 1) == q + 1
    # q + 1 parallel classes of q blocks, each class a partition of the points
    for c in range(q + 1):
        points = sorted(p for block in d.blocks[c * q:(c + 1) * q] for p in block)
        assert points == list(range(q * q))


def test_fano_plane_is_the_7_3_1_design():
    d = fano_plane()
    assert check_design(d.blocks, 7, 3, 1) == 3 and d.b == 7
    assert all(len(set(a) & set(b)) == 1 for a, b in itertools.combinations(d.blocks, 2))


@pytest.mark.parametrize("name", DESIGNS)
def test_every_named_design_is_checked_and_has_the_density_k_over_v(name):
    d = design(name)
    assert incidence(d.blocks, d.v).mean() == pytest.approx(d.density)


@pytest.mark.parametrize("blocks,v,k,lam,words", [
    ([(0, 1), (0, 2), (1, 2, 3)], 4, 2, 1, "block 2"),                 # a block of the wrong size
    ([(0, 0), (1, 2)], 3, 2, 1, "repeats a point"),
    ([(0, 5), (1, 2)], 3, 2, 1, "point 5"),
    ([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)], 4, 2, 1, "point"),      # (2, 3) missing: r is off
    ([(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3), (0, 1, 2), (0, 1, 3)], 4, 3, 2, "point"),
    ([], 3, 2, 1, "at least one block"),
])
def test_the_checker_names_what_is_wrong(blocks, v, k, lam, words):
    with pytest.raises(DesignError, match=words):
        check_design(blocks, v, k, lam)


def test_the_checker_names_a_pair_that_meets_too_often():
    # 2-(4, 2, 1) has six blocks; swap one pair for another: every point still in 3 blocks
    blocks = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    check_design(blocks, 4, 2, 1)
    bad = [(0, 1), (0, 1), (0, 3), (1, 2), (2, 3), (2, 3)]
    with pytest.raises(DesignError, match=r"pair \(0, 1\) lies together in 2 blocks"):
        check_design(bad, 4, 2, 1)
    d = affine_plane(3)
    broken = list(d.blocks)
    broken[0] = (broken[0][0], broken[0][1], (broken[0][2] + 1) % 9)
    with pytest.raises(DesignError):
        check_design(broken, 9, 3, 1)


def test_random_blocks_have_the_same_size_and_are_seeded():
    a, b = random_blocks(9, 12, 3, seed=4), random_blocks(9, 12, 3, seed=4)
    assert a == b and len(a) == 12 and all(len(set(x)) == 3 for x in a)
    assert incidence(a, 9).mean() == pytest.approx(1 / 3)
    assert random_blocks(9, 12, 3, seed=5) != a
    with pytest.raises(DesignError):
        check_design(a, 9, 3, 1)   # what a random mask loses: the balance


@pytest.mark.parametrize("name,nodes", [("affine:3", 3), ("affine:2", 2), ("fano", 3), ("affine:4", 4)])
def test_the_partition_shares_every_block_once_and_evenly(name, nodes):
    d = design(name)
    parts = partition_blocks(d.blocks, nodes)
    assert sorted(i for p in parts for i in p) == list(range(d.b))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    slices = [len({q for i in p for q in d.blocks[i]}) for p in parts]
    assert all(s <= d.v for s in slices)
    if name == "affine:3":
        assert slices == [7, 7, 7]   # the fewest: 4 lines of AG(2, 3) need 7 of its 9 points


def test_partition_and_split_refuse_what_cannot_be_done():
    with pytest.raises(DesignError):
        partition_blocks(fano_plane().blocks, 8)
    with pytest.raises(DesignError):
        split_sizes(3, 4)
    assert split_sizes(24, 9) == [3] * 6 + [2] * 3
