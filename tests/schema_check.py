"""What a migrated database holds against what the models declare (tests/test_store.py on
SQLite, tests/test_postgres.py on PostgreSQL)."""

from __future__ import annotations

from typing import Any

from quotaserver import models

GROUPS = (
    models.ALL_MODELS,
    models.AUTH_MODELS,
    models.SCALE_MODELS,
    models.LOAD_MODELS,
    models.CLUSTER_AUTH_MODELS,
    models.IDEMPOTENCY_MODELS,
    models.PLUGIN_MODELS,
)


def disagreements(db: Any) -> list[str]:
    """Each table or column that a model declares and the database lacks or shapes
    otherwise (name, nullability), and each column the database has that no model does."""
    wrong = []
    tables = set(db.get_tables())
    for model in (m for group in GROUPS for m in group):
        table = model._meta.table_name
        if table not in tables:
            wrong.append(f"{table}: missing")
            continue
        have = {c.name: c.null for c in db.get_columns(table)}
        want = {f.column_name: bool(f.null) for f in model._meta.sorted_fields}
        for name in sorted(set(want) | set(have)):
            if name not in have:
                wrong.append(f"{table}.{name}: missing")
            elif name not in want:
                wrong.append(f"{table}.{name}: not in the model")
            elif have[name] != want[name] and not model._meta.fields[name].primary_key:
                wrong.append(f"{table}.{name}: null is {have[name]}, the model says {want[name]}")
        indexed = {tuple(i.columns) for i in db.get_indexes(table)}
        for fields, _unique in model._meta.indexes:
            columns = tuple(model._meta.fields[f].column_name for f in fields)
            if columns not in indexed:
                wrong.append(f"{table}: no index on {columns}")
    return wrong
