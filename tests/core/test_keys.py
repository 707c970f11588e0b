"""core/keys.py: one registry of the hash role ids, no id used twice, and every keyed hash in
the code takes its role from it."""
from __future__ import annotations

import ast
import enum
from pathlib import Path

import pytest

from core.keys import Role

ROOT = Path(__file__).resolve().parents[2]


def _is_keyed_hash(func) -> bool:
    """core/keys.py's ``hash_keys`` or ``uniform`` (not a numpy Generator's ``uniform``)."""
    if isinstance(func, ast.Name):
        return func.id in ("hash_keys", "uniform")
    return isinstance(func, ast.Attribute) and (func.attr == "hash_keys" or (
        func.attr == "uniform" and getattr(func.value, "id", "") in ("V", "views")))


def test_no_two_roles_share_an_id():
    ids = [member.value for member in Role.__members__.values()]      # aliases included
    assert len(ids) == len(set(ids)) == len(Role)


def test_a_registry_with_a_shared_id_is_refused_when_defined():
    with pytest.raises(ValueError, match="duplicate values"):
        enum.unique(enum.IntEnum("Clash", {"PACK_ORDER": 21, "FRESH_CROP": 21}))


def test_the_ids_that_stored_data_depends_on_keep_their_values():
    """Feature stores hold views drawn under 1-5; prepared sets are packed under 21."""
    assert [Role.CROP, Role.FLIP, Role.TEACHER, Role.STUDENT, Role.STATS] == [1, 2, 3, 4, 5]
    assert Role.PACK_ORDER == 21
    assert (Role.SHARD_ORDER, Role.SAMPLE_ORDER) == (11, 12)


def _is_role(node, aliases: dict) -> bool:
    """``Role.X``, or a module-level name assigned ``Role.X``."""
    if isinstance(node, ast.Name) and node.id in aliases:
        node = aliases[node.id]
    return isinstance(node, ast.Attribute) and getattr(node.value, "id", "") == "Role"


def _hash_calls():
    """(file, line, call, module-level aliases) of every call of a keyed hash outside the tests."""
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".venv", "build") or any(p.startswith(".") for p in rel.parts):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                   if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _is_keyed_hash(node.func):
                yield rel, node.lineno, node, aliases


def test_every_keyed_hash_takes_its_role_from_the_registry():
    calls = list(_hash_calls())
    files = {str(rel) for rel, *_ in calls}
    assert {"data/views.py", "data/pack.py", "data/order.py"} <= files, files
    for rel, line, call, aliases in calls:
        literals = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, int)]
        assert not literals, f"{rel}:{line}: an integer key {literals} in a keyed hash; give it a Role"
        if not any(_is_role(a, aliases) for a in call.args):   # the role arrives as a variable: only in the hash's own
            assert str(rel) in ("core/keys.py", "data/views.py"), f"{rel}:{line}: a keyed hash without a Role"  # helpers
