"""Genotype strings: canonical round trips, published cells, and clear rejections."""

import json

import pytest

from oneshot import genotypes as G
from oneshot.genotypes import GenotypeError, parse, resolve


@pytest.mark.parametrize("name", sorted(G.PUBLISHED))
def test_published_round_trip(name):
    g = G.PUBLISHED[name]
    assert parse(G.format(g)) == g
    assert parse(json.dumps(g.to_json())) == g
    assert resolve(name) is g


def test_nb201_canonical_string():
    s = "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|"
    g = parse(s)
    assert str(g) == s and g == G.NB201_RESNET
    assert g.edge_ops == ("nor_conv_3x3", "none", "nor_conv_3x3", "skip_connect", "none", "skip_connect")
    assert G.NB201Genotype.from_edge_ops(g.edge_ops) == g


def test_darts_accepts_repository_spellings():
    # Published files use range(2, 6) and odd whitespace; both mean the canonical form.
    text = str(G.PC_DARTS).replace("normal_concat=[2, 3, 4, 5]", "normal_concat = range(2, 6)")
    assert parse("  " + text.replace(", ", ",\n ") + "\n") == G.PC_DARTS


BAD = [
    ("", "cannot read genotype"),
    ("hello", "cannot read genotype"),
    ("|nor_conv_3x3~0|+|none~0|", "node 2 needs 2 edges"),
    ("|none~0|+|none~0|none~1|+|none~0|none~1|none~2|+|none~0|none~1|none~2|none~3|", "has 4 nodes"),
    ("|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|", "node 3 needs 3 edges"),
    ("|conv_9x9~0|+|none~0|none~1|+|none~0|none~1|none~2|", "unknown op 'conv_9x9'.*nor_conv_3x3"),
    ("|none~1|+|none~0|none~1|+|none~0|none~1|none~2|", "reads from node 1"),
    ("|none0|+|none~0|none~1|+|none~0|none~1|none~2|", "not 'op~source'"),
    ("|none~0|+none~0|none~1|+|none~0|none~1|none~2|", "node 2"),
    ("Genotype(normal=[('sep_conv_3x3', 0)], normal_concat=[2], reduce=[('sep_conv_3x3', 0)], reduce_concat=[2])",
     "two"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 2)], normal_concat=[2], "
     "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=[2])", "reads from node 2"),
    ("Genotype(normal=[('sep_conv_9x9', 0), ('sep_conv_3x3', 1)], normal_concat=[2], "
     "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=[2])", "unknown op 'sep_conv_9x9'"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], normal_concat=[7], "
     "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=[2])", "normal_concat"),
    ("Genotype(normal=__import__('os').system('true'))", "exactly the keywords"),
    ("Genotype(normal=[(1, 'a'), ('x', 1)], normal_concat=[2], reduce=[], reduce_concat=[2])", "is not"),
    ("Genotype(normal=[", "malformed DARTS genotype"),
    ('{"genome": 1}', "'genotype' key"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_malformed_strings_are_rejected_with_a_reason(text, message):
    with pytest.raises(GenotypeError, match=message):
        parse(text)


def test_resolve_reads_run_files(tmp_path):
    (tmp_path / "genotype.txt").write_text(str(G.DARTS_V2) + "\n")
    (tmp_path / "g.json").write_text(json.dumps(G.NB201_RESNET.to_json()))
    assert resolve(tmp_path) == G.DARTS_V2
    assert resolve(tmp_path / "genotype.txt") == G.DARTS_V2
    assert resolve(str(tmp_path / "g.json")) == G.NB201_RESNET


def test_resolve_unknown_name_lists_published():
    with pytest.raises(GenotypeError, match="DARTS_V3.*DARTS_V2"):
        resolve("DARTS_V3")


def test_genotypes_are_frozen_and_hashable():
    with pytest.raises(AttributeError):
        G.DARTS_V2.normal = ()
    assert len({G.DARTS_V2, parse(str(G.DARTS_V2))}) == 1


# Quoted from the ENAS authors' scripts/cifar10_micro_final.sh (melodyguan/enas, lines 5-6).
ENAS_FIXED_ARC = "0 2 0 0 0 4 0 1 0 4 1 1 1 0 0 1 0 2 1 1" + " " + "1 0 1 0 0 3 0 2 1 1 3 1 1 0 0 4 0 3 1 1"
# src/cifar10/micro_child.py: `_fixed_conv` with f_sizes [3, 5] for ops 0, 1 (two stacked
# separable convs, as DARTS' sep_conv), average / max pooling for 2 / 3, identity (a factorized
# reduction at stride 2) for 4.
ENAS_OPS = {0: "sep_conv_3x3", 1: "sep_conv_5x5", 2: "avg_pool_3x3", 3: "max_pool_3x3", 4: "skip_connect"}


def decode_enas_micro(arc: str, num_cells: int = 5) -> G.DartsGenotype:
    """The authors' reading (``connect_controller``, ``_fixed_layer``, ``_fixed_combine``): the
    first 4 * num_cells numbers are the normal cell; each node is x_id, x_op, y_id, y_op; the
    output concatenates every node that no node uses as an input."""
    numbers = [int(t) for t in arc.split()]
    assert len(numbers) == 8 * num_cells
    cells = []
    for part in (numbers[: 4 * num_cells], numbers[4 * num_cells :]):
        used = [0] * (num_cells + 2)
        edges = []
        for node in range(num_cells):
            x_id, x_op, y_id, y_op = part[4 * node : 4 * node + 4]
            assert x_id < node + 2 and y_id < node + 2
            used[x_id] += 1
            used[y_id] += 1
            edges += [(ENAS_OPS[x_op], x_id), (ENAS_OPS[y_op], y_id)]
        concat = tuple(i for i in range(num_cells + 2) if used[i] == 0)
        cells.append((tuple(edges), concat))
    (normal, normal_concat), (reduce, reduce_concat) = cells
    return G.DartsGenotype(normal, normal_concat, reduce, reduce_concat)


def test_enas_is_the_authors_fixed_arc():
    g = decode_enas_micro(ENAS_FIXED_ARC)
    assert g == G.ENAS
    # Spot checks by hand against the script: normal node 2 = avg pool(0) + sep 3x3(0); reduce
    # node 4 reads node 3, so the reduce output leaves node 3 out.
    assert G.ENAS.normal[:2] == (("avg_pool_3x3", 0), ("sep_conv_3x3", 0))
    assert G.ENAS.reduce[4:6] == (("sep_conv_5x5", 1), ("sep_conv_5x5", 3)) and G.ENAS.reduce_concat == (2, 4, 5, 6)
