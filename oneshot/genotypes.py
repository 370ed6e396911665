"""Genotypes: the discrete architectures a search derives, as frozen values with canonical strings.

* ``NB201Genotype`` - NAS-Bench-201's string ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``, node by
  node, each entry ``op~source``.
* ``DartsGenotype`` - the DARTS repository's form, ``Genotype(normal=[('sep_conv_3x3', 0), ...],
  normal_concat=[2, 3, 4, 5], reduce=[...], reduce_concat=[...])``: two ``(op, input)`` pairs per
  intermediate node, inputs 0 and 1 being the two previous cells' outputs.

``parse()`` accepts either form (and the JSON that ``to_json()`` writes) and never evaluates
code: the DARTS form is read with ``ast`` and every node is checked. Anything else raises
``GenotypeError`` with a message that names the problem.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

from oneshot.ops import DARTS_PRIMITIVES, NB201_PRIMITIVES, OPS


class GenotypeError(ValueError):
    """A genotype string, file or name that cannot be read, or that does not fit its space."""


Edge = tuple[str, int]


@dataclass(frozen=True)
class NB201Genotype:
    """``nodes[j-1]`` lists the ``(op, source)`` edges into node ``j`` (node 0 is the input)."""

    nodes: tuple[tuple[Edge, ...], ...]
    space = "nb201"

    def __str__(self) -> str:
        return "+".join("|" + "|".join(f"{op}~{src}" for op, src in node) + "|" for node in self.nodes)

    @property
    def edge_ops(self) -> tuple[str, ...]:
        """Ops in the supernet's edge order: (1<-0), (2<-0), (2<-1), (3<-0), ..."""
        return tuple(op for node in self.nodes for op, _ in node)

    @classmethod
    def from_edge_ops(cls, ops, n_nodes: int = 4) -> NB201Genotype:
        ops, nodes, k = list(ops), [], 0
        for j in range(1, n_nodes):
            nodes.append(tuple((ops[k + i], i) for i in range(j)))
            k += j
        if k != len(ops):
            raise GenotypeError(f"{len(ops)} edge ops do not fill a {n_nodes}-node NB201 cell ({k} edges)")
        return cls(tuple(nodes))

    def to_json(self) -> dict:
        return {"space": self.space, "genotype": str(self), "nodes": [list(map(list, n)) for n in self.nodes]}


@dataclass(frozen=True)
class DartsGenotype:
    """Normal and reduction cells, two ``(op, input)`` pairs per intermediate node."""

    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]
    space = "darts"

    def __str__(self) -> str:
        def edges(es):
            return "[" + ", ".join(f"('{op}', {i})" for op, i in es) + "]"

        return (
            f"Genotype(normal={edges(self.normal)}, normal_concat={list(self.normal_concat)}, "
            f"reduce={edges(self.reduce)}, reduce_concat={list(self.reduce_concat)})"
        )

    @property
    def steps(self) -> int:
        return len(self.normal) // 2

    def to_json(self) -> dict:
        return {
            "space": self.space,
            "genotype": str(self),
            "normal": [list(e) for e in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [list(e) for e in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }


Genotype = NB201Genotype | DartsGenotype

_NB201_EDGE = re.compile(r"^([A-Za-z0-9_]+)~(\d+)$")


def _check_op(op: str, valid, where: str) -> None:
    if op not in valid:
        raise GenotypeError(f"unknown op {op!r} in {where}; valid ops: {', '.join(valid)}")


def parse_nb201(text: str, primitives=NB201_PRIMITIVES) -> NB201Genotype:
    text = text.strip()
    if not text.startswith("|") or not text.endswith("|"):
        raise GenotypeError(f"malformed NB201 genotype {text!r}: expected '|op~0|+|op~0|op~1|+...'")
    nodes = []
    for j, chunk in enumerate(text.split("+"), start=1):
        if len(chunk) < 2 or not (chunk.startswith("|") and chunk.endswith("|")):
            raise GenotypeError(f"malformed NB201 genotype {text!r}: node {j} is {chunk!r}, not '|op~i|...|'")
        entries = chunk[1:-1].split("|")
        if len(entries) != j:
            raise GenotypeError(f"malformed NB201 genotype {text!r}: node {j} needs {j} edges, got {len(entries)}")
        node = []
        for i, entry in enumerate(entries):
            m = _NB201_EDGE.match(entry)
            if not m:
                raise GenotypeError(f"malformed NB201 genotype {text!r}: edge {entry!r} is not 'op~source'")
            op, src = m.group(1), int(m.group(2))
            _check_op(op, primitives, f"node {j}")
            if src != i:
                raise GenotypeError(
                    f"NB201 genotype {text!r}: node {j} edge {i} reads from node {src}; expected {i} "
                    f"(valid sources of node {j}: 0..{j - 1}, in order)"
                )
            node.append((op, src))
        nodes.append(tuple(node))
    if len(nodes) != 3:
        raise GenotypeError(f"NB201 genotype {text!r} has {len(nodes)} nodes; the NB201 cell has 3 (+ input)")
    return NB201Genotype(tuple(nodes))


def _literal_edges(node: ast.AST, field: str, text: str) -> tuple[Edge, ...]:
    if not isinstance(node, ast.List | ast.Tuple):
        raise GenotypeError(f"malformed DARTS genotype: {field} must be a list of (op, input) pairs")
    edges = []
    for elt in node.elts:
        ok = (
            isinstance(elt, ast.Tuple | ast.List)
            and len(elt.elts) == 2
            and isinstance(elt.elts[0], ast.Constant)
            and isinstance(elt.elts[0].value, str)
            and isinstance(elt.elts[1], ast.Constant)
            and type(elt.elts[1].value) is int
        )
        if not ok:
            raise GenotypeError(f"malformed DARTS genotype: {field} entry {ast.unparse(elt)!r} is not ('op', int)")
        edges.append((elt.elts[0].value, elt.elts[1].value))
    return tuple(edges)


def _literal_concat(node: ast.AST, field: str) -> tuple[int, ...]:
    # `range(2, 6)` appears in many published genotype files; accept it as well as a list.
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range":
        args = node.args
        if 1 <= len(args) <= 2 and all(isinstance(a, ast.Constant) and type(a.value) is int for a in args):
            return tuple(range(*[a.value for a in args]))
    if isinstance(node, ast.List | ast.Tuple) and all(
        isinstance(e, ast.Constant) and type(e.value) is int for e in node.elts
    ):
        return tuple(e.value for e in node.elts)
    raise GenotypeError(f"malformed DARTS genotype: {field} must be a list of node indices")


def parse_darts(text: str, primitives=None) -> DartsGenotype:
    fields = ("normal", "normal_concat", "reduce", "reduce_concat")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise GenotypeError(f"malformed DARTS genotype {text!r}: {e.msg}") from None
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "Genotype"):
        raise GenotypeError(f"malformed DARTS genotype {text!r}: expected Genotype(normal=..., ...)")
    if tree.args or {k.arg for k in tree.keywords} != set(fields) or len(tree.keywords) != 4:
        raise GenotypeError(f"malformed DARTS genotype {text!r}: needs exactly the keywords {', '.join(fields)}")
    kw = {k.arg: k.value for k in tree.keywords}
    g = DartsGenotype(
        normal=_literal_edges(kw["normal"], "normal", text),
        normal_concat=_literal_concat(kw["normal_concat"], "normal_concat"),
        reduce=_literal_edges(kw["reduce"], "reduce", text),
        reduce_concat=_literal_concat(kw["reduce_concat"], "reduce_concat"),
    )
    validate_darts(g, primitives)
    return g


def validate_darts(g: DartsGenotype, primitives=None) -> None:
    """Every node has two inputs among the cell inputs and earlier nodes; concat names nodes."""
    valid = tuple(primitives) if primitives is not None else tuple(sorted(set(OPS) - {"nor_conv_1x1", "nor_conv_3x3"}))
    for cell, edges, concat in (("normal", g.normal, g.normal_concat), ("reduce", g.reduce, g.reduce_concat)):
        if not edges or len(edges) % 2:
            raise GenotypeError(f"DARTS genotype: {cell} needs two (op, input) pairs per node, got {len(edges)}")
        steps = len(edges) // 2
        for k, (op, src) in enumerate(edges):
            node = k // 2 + 2
            _check_op(op, valid, f"{cell} node {node}")
            if not 0 <= src < node:
                raise GenotypeError(
                    f"DARTS genotype: {cell} node {node} reads from node {src}; valid inputs are 0..{node - 1}"
                )
        if not concat or len(set(concat)) != len(concat) or not all(2 <= c < steps + 2 for c in concat):
            raise GenotypeError(
                f"DARTS genotype: {cell}_concat {list(concat)} must name distinct nodes among 2..{steps + 1}"
            )
    if len(g.normal) != len(g.reduce):
        raise GenotypeError("DARTS genotype: normal and reduce cells must have the same number of nodes")


def parse(text: str) -> Genotype:
    """Read a genotype from its canonical string (either space) or from ``to_json()`` output."""
    if not isinstance(text, str):
        raise GenotypeError(f"a genotype string is expected, got {type(text).__name__}")
    s = text.strip()
    if s.startswith("{"):
        try:
            return parse(json.loads(s)["genotype"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise GenotypeError(f"malformed genotype JSON {s[:80]!r}: expected an object with a 'genotype' key") from None
    if s.startswith("|"):
        return parse_nb201(s)
    if s.startswith("Genotype"):
        return parse_darts(s)
    raise GenotypeError(
        f"cannot read genotype {s[:80]!r}: expected an NB201 string '|op~0|+|op~0|op~1|+...', a DARTS "
        f"'Genotype(normal=..., ...)', a genotype file, or a published name ({', '.join(PUBLISHED)})"
    )


def format(genotype: Genotype) -> str:  # noqa: A001 - the counterpart of parse()
    return str(genotype)


def resolve(spec) -> Genotype:
    """A published name, a genotype file (``genotype.txt``/``genotype.json``), a string, or a value."""
    if isinstance(spec, NB201Genotype | DartsGenotype):
        return spec
    spec = str(spec).strip()
    if spec in PUBLISHED:
        return PUBLISHED[spec]
    if not spec.startswith(("|", "Genotype", "{")):
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "genotype.txt").is_file():
                raise GenotypeError(
                    f"genotype={spec}: the directory {path} holds no genotype.txt (a search run directory "
                    "has one once its search has ended)"
                )
            path = path / "genotype.txt"
        if path.is_file():
            return _read_genotype_file(spec, path)
        raise GenotypeError(
            f"genotype {spec!r} is neither a published name ({', '.join(PUBLISHED)}), an existing file, "
            "nor a genotype string"
        )
    return parse(spec)


# A genotype file is one line of text or a small JSON object; anything longer is something else.
_MAX_GENOTYPE_FILE = 1 << 16


def random_genotype(supernet, rng) -> Genotype:
    """A uniformly drawn architecture of an NB201 or DARTS supernet (``rng``: a ``random.Random``):
    NB201 one candidate per edge; DARTS two distinct inputs per node, a non-``none`` op on each."""
    if set(supernet.candidates) == {"cell"}:
        return NB201Genotype.from_edge_ops([rng.choice(c) for c in supernet.candidates["cell"]])
    cells = []
    for t in ("normal", "reduce"):
        pairs, start = [], 0
        for node in range(supernet.steps):
            for j in rng.sample(range(node + 2), 2):
                ops = [o for o in supernet.candidates[t][start + j] if o != "none"]
                pairs.append((rng.choice(ops), j))
            start += node + 2
        cells.append(tuple(pairs))
    concat = tuple(range(2 + supernet.steps - supernet.multiplier, supernet.steps + 2))
    return DartsGenotype(cells[0], concat, cells[1], concat)


def _read_genotype_file(spec: str, path: Path) -> Genotype:
    """The genotype in a file, or an error that names the file but never shows what it holds:
    ``genotype=`` may point at any readable file, and its contents must not end up in a log."""
    not_one = (
        f"genotype={spec}: {path} is not a genotype file (expected a genotype.txt/genotype.json "
        "written by oneshot-search, or a run directory)"
    )
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_GENOTYPE_FILE + 1)
    except OSError as e:
        raise GenotypeError(f"genotype={spec}: {path} cannot be read ({e.strerror or type(e).__name__})") from None
    if len(data) > _MAX_GENOTYPE_FILE:
        raise GenotypeError(not_one)
    try:
        return parse(data.decode("utf-8"))
    except (UnicodeDecodeError, GenotypeError, RecursionError):
        raise GenotypeError(not_one) from None


def _darts(normal, reduce, normal_concat=(2, 3, 4, 5), reduce_concat=(2, 3, 4, 5)):
    return DartsGenotype(tuple(normal), tuple(normal_concat), tuple(reduce), tuple(reduce_concat))


# Published cells, transcribed from the authors' repositories.
DARTS_V1 = _darts(
    [("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
     ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
    [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
     ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
)  # fmt: skip
DARTS_V2 = _darts(
    [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
     ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
     ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
)  # fmt: skip
PC_DARTS = _darts(
    [("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
     ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)],
    [("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
     ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)],
)  # fmt: skip
# ENAS' CIFAR-10 micro cells (Pham et al. 2018), five intermediate nodes: the authors' `fixed_arc`,
# melodyguan/enas (commit 4bcfd73) scripts/cifar10_micro_final.sh lines 5-6, decoded as
# src/cifar10/micro_child.py `_fixed_layer` reads it: 20 numbers per cell (normal, then reduce),
# per node (input, op, input, op); ops 0 sep 3x3, 1 sep 5x5, 2 avg pool, 3 max pool, 4 identity
# (stride 2: a factorized reduce, as DARTS' skip_connect). Nodes no node reads are concatenated
# (`_fixed_combine`). tests/test_genotypes.py decodes the string itself.
ENAS = _darts(
    [("avg_pool_3x3", 0), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_5x5", 0),
     ("skip_connect", 0), ("sep_conv_5x5", 1), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0),
     ("avg_pool_3x3", 0), ("sep_conv_5x5", 1)],
    [("sep_conv_3x3", 1), ("sep_conv_3x3", 1), ("max_pool_3x3", 0), ("avg_pool_3x3", 0),
     ("sep_conv_5x5", 1), ("sep_conv_5x5", 3), ("sep_conv_3x3", 1), ("skip_connect", 0),
     ("max_pool_3x3", 0), ("sep_conv_5x5", 1)],
    normal_concat=(2, 3, 4, 5, 6),
    reduce_concat=(2, 4, 5, 6),
)  # fmt: skip
# NAS-Bench-201's ResNet cell and its best CIFAR-10 cell (index 6111).
NB201_RESNET = parse_nb201("|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|")
NB201_BEST_CIFAR10 = parse_nb201(
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|"
)

PUBLISHED: dict[str, Genotype] = {
    "DARTS_V1": DARTS_V1,
    "DARTS_V2": DARTS_V2,
    "PC_DARTS": PC_DARTS,
    "ENAS": ENAS,
    "NB201_RESNET": NB201_RESNET,
    "NB201_BEST_CIFAR10": NB201_BEST_CIFAR10,
}

assert set(DARTS_PRIMITIVES) <= set(OPS) and set(NB201_PRIMITIVES) <= set(OPS)
