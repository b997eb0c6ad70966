# ruff: noqa: E501 - generated statements, one per line
"""The tables of migrations 1-3, written out: what ``create_tables`` made of the models
when those migrations were released (generated once from them, per dialect; never edit).

Migrations create what they created then, whatever the models say later: a model that
changes needs a new migration (an ALTER), and ``tests/test_store.py`` fails when a freshly
migrated database and the models disagree.
"""

from __future__ import annotations

# version -> dialect -> statements, in order (tables before the indexes on them).
FROZEN: dict[int, dict[str, tuple[str, ...]]] = {
    1: {  # Initial schema.
        "sqlite": (
            'CREATE TABLE IF NOT EXISTS "user" ("id" INTEGER NOT NULL PRIMARY KEY, "username" VARCHAR(255) NOT NULL, "created_at" DATETIME NOT NULL)',
            'CREATE UNIQUE INDEX IF NOT EXISTS "user_username" ON "user" ("username")',
            'CREATE TABLE IF NOT EXISTS "quota_rule" ("id" INTEGER NOT NULL PRIMARY KEY, "scope" VARCHAR(32) NOT NULL, "user_id" INTEGER, "command_type" VARCHAR(64) NOT NULL, "period" VARCHAR(16) NOT NULL, "limit" INTEGER, "updated_at" DATETIME NOT NULL, FOREIGN KEY ("user_id") REFERENCES "user" ("id") ON DELETE CASCADE)',
            'CREATE INDEX IF NOT EXISTS "quota_rule_user_id" ON "quota_rule" ("user_id")',
            'CREATE UNIQUE INDEX IF NOT EXISTS "quota_rule_scope_command_type_period" ON "quota_rule" ("scope", "command_type", "period")',
            'CREATE TABLE IF NOT EXISTS "usage" ("id" INTEGER NOT NULL PRIMARY KEY, "user_id" INTEGER NOT NULL, "command_type" VARCHAR(64) NOT NULL, "period" VARCHAR(16) NOT NULL, "window_start" INTEGER NOT NULL, "used" INTEGER NOT NULL, FOREIGN KEY ("user_id") REFERENCES "user" ("id") ON DELETE CASCADE)',
            'CREATE INDEX IF NOT EXISTS "usage_user_id" ON "usage" ("user_id")',
            'CREATE UNIQUE INDEX IF NOT EXISTS "usage_user_id_command_type_period_window_start" ON "usage" ("user_id", "command_type", "period", "window_start")',
            'CREATE INDEX IF NOT EXISTS "usage_period_window_start" ON "usage" ("period", "window_start")',
            'CREATE TABLE IF NOT EXISTS "violation" ("id" INTEGER NOT NULL PRIMARY KEY, "user_id" INTEGER NOT NULL, "command_type" VARCHAR(64) NOT NULL, "period" VARCHAR(16) NOT NULL, "limit" INTEGER NOT NULL, "attempted" INTEGER NOT NULL, "message" TEXT NOT NULL, "created_at" DATETIME NOT NULL, FOREIGN KEY ("user_id") REFERENCES "user" ("id") ON DELETE CASCADE)',
            'CREATE INDEX IF NOT EXISTS "violation_user_id" ON "violation" ("user_id")',
            'CREATE INDEX IF NOT EXISTS "violation_created_at" ON "violation" ("created_at")',
            'CREATE TABLE IF NOT EXISTS "event" ("id" INTEGER NOT NULL PRIMARY KEY, "type" VARCHAR(64) NOT NULL, "data" TEXT NOT NULL, "created_at" DATETIME NOT NULL)',
            'CREATE TABLE IF NOT EXISTS "alert" ("id" INTEGER NOT NULL PRIMARY KEY, "rule" VARCHAR(64) NOT NULL, "severity" VARCHAR(16) NOT NULL, "user_id" INTEGER, "message" TEXT NOT NULL, "action_needed" TEXT NOT NULL, "count" INTEGER NOT NULL, "status" VARCHAR(16) NOT NULL, "dedupe_key" VARCHAR(160), "created_at" DATETIME NOT NULL, "updated_at" DATETIME NOT NULL, "acknowledged_by" VARCHAR(128), "acknowledged_at" DATETIME, "resolved_by" VARCHAR(128), "resolved_at" DATETIME, FOREIGN KEY ("user_id") REFERENCES "user" ("id") ON DELETE CASCADE)',
            'CREATE INDEX IF NOT EXISTS "alert_user_id" ON "alert" ("user_id")',
            'CREATE INDEX IF NOT EXISTS "alert_status" ON "alert" ("status")',
            'CREATE UNIQUE INDEX IF NOT EXISTS "alert_dedupe_key" ON "alert" ("dedupe_key")',
            'CREATE INDEX IF NOT EXISTS "alert_created_at" ON "alert" ("created_at")',
            'CREATE TABLE IF NOT EXISTS "audit_log" ("id" INTEGER NOT NULL PRIMARY KEY, "actor" VARCHAR(128) NOT NULL, "action" VARCHAR(64) NOT NULL, "target" VARCHAR(255) NOT NULL, "details" TEXT NOT NULL, "created_at" DATETIME NOT NULL)',
            'CREATE INDEX IF NOT EXISTS "audit_log_created_at" ON "audit_log" ("created_at")',
            'CREATE TABLE IF NOT EXISTS "activity" ("minute" INTEGER NOT NULL PRIMARY KEY, "commands" INTEGER NOT NULL, "violations" INTEGER NOT NULL)',
        ),
        "postgresql": (
            'CREATE TABLE IF NOT EXISTS "user" ("id" SERIAL NOT NULL PRIMARY KEY, "username" VARCHAR(255) NOT NULL, "created_at" TIMESTAMP NOT NULL)',
            'CREATE UNIQUE INDEX IF NOT EXISTS "user_username" ON "user" ("username")',
            'CREATE TABLE IF NOT EXISTS "quota_rule" ("id" SERIAL NOT NULL PRIMARY KEY, "scope" VARCHAR(32) NOT NULL, "user_id" INTEGER, "command_type" VARCHAR(64) NOT NULL, "period" VARCHAR(16) NOT NULL, "limit" BIGINT, "updated_at" TIMESTAMP NOT NULL, FOREIGN KEY ("user_id") REFERENCES "user" ("id") ON DELETE CASCADE)',
            'CREATE INDEX IF NOT EXISTS "quota_rule_user_id" ON "quota_rule" ("user_id")',
            'CREATE UNIQUE INDEX IF NOT EXISTS "quota_rule_scope_command_type_period" ON "quota_rule" ("scope", "command_type", "period")',
            'CREATE TABLE IF NOT EXISTS "usage" ("id" SERIAL NOT NULL PRIMARY KEY, "user_id" INTEGER NOT NULL, "command_type" VARCHAR(64) NOT NULL, "period" VARCHAR(16) NOT NULL, "window_start" BIGINT NOT NULL, "used" BIGINT NOT NULL, FOREIGN KEY ("user_id") REFERENCES "user" ("id") ON DELETE CASCADE)',
            'CREATE INDEX IF NOT EXISTS "usage_user_id" ON "usage" ("user_id")',
            'CREATE UNIQUE INDEX IF NOT EXISTS "usage_user_id_command_type_period_window_start" ON "usage" ("user_id", "command_type", "period", "window_start")',
            'CREATE INDEX IF NOT EXISTS "usage_period_window_start" ON "usage" ("period", "window_start")',
            'CREATE TABLE IF NOT EXISTS "violation" ("id" SERIAL NOT NULL PRIMARY KEY, "user_id" INTEGER NOT NULL, "command_type" VARCHAR(64) NOT NULL, "period" VARCHAR(16) NOT NULL, "limit" BIGINT NOT NULL, "attempted" BIGINT NOT NULL, "message" TEXT NOT NULL, "created_at" TIMESTAMP NOT NULL, FOREIGN KEY ("user_id") REFERENCES "user" ("id") ON DELETE CASCADE)',
            'CREATE INDEX IF NOT EXISTS "violation_user_id" ON "violation" ("user_id")',
            'CREATE INDEX IF NOT EXISTS "violation_created_at" ON "violation" ("created_at")',
            'CREATE TABLE IF NOT EXISTS "event" ("id" SERIAL NOT NULL PRIMARY KEY, "type" VARCHAR(64) NOT NULL, "data" TEXT NOT NULL, "created_at" TIMESTAMP NOT NULL)',
            'CREATE TABLE IF NOT EXISTS "alert" ("id" SERIAL NOT NULL PRIMARY KEY, "rule" VARCHAR(64) NOT NULL, "severity" VARCHAR(16) NOT NULL, "user_id" INTEGER, "message" TEXT NOT NULL, "action_needed" TEXT NOT NULL, "count" INTEGER NOT NULL, "status" VARCHAR(16) NOT NULL, "dedupe_key" VARCHAR(160), "created_at" TIMESTAMP NOT NULL, "updated_at" TIMESTAMP NOT NULL, "acknowledged_by" VARCHAR(128), "acknowledged_at" TIMESTAMP, "resolved_by" VARCHAR(128), "resolved_at" TIMESTAMP, FOREIGN KEY ("user_id") REFERENCES "user" ("id") ON DELETE CASCADE)',
            'CREATE INDEX IF NOT EXISTS "alert_user_id" ON "alert" ("user_id")',
            'CREATE INDEX IF NOT EXISTS "alert_status" ON "alert" ("status")',
            'CREATE UNIQUE INDEX IF NOT EXISTS "alert_dedupe_key" ON "alert" ("dedupe_key")',
            'CREATE INDEX IF NOT EXISTS "alert_created_at" ON "alert" ("created_at")',
            'CREATE TABLE IF NOT EXISTS "audit_log" ("id" SERIAL NOT NULL PRIMARY KEY, "actor" VARCHAR(128) NOT NULL, "action" VARCHAR(64) NOT NULL, "target" VARCHAR(255) NOT NULL, "details" TEXT NOT NULL, "created_at" TIMESTAMP NOT NULL)',
            'CREATE INDEX IF NOT EXISTS "audit_log_created_at" ON "audit_log" ("created_at")',
            'CREATE TABLE IF NOT EXISTS "activity" ("minute" BIGINT NOT NULL PRIMARY KEY, "commands" BIGINT NOT NULL, "violations" BIGINT NOT NULL)',
        ),
    },
    2: {  # API tokens (digests only) and token/session revocations.
        "sqlite": (
            'CREATE TABLE IF NOT EXISTS "api_token" ("id" INTEGER NOT NULL PRIMARY KEY, "digest" VARCHAR(64) NOT NULL, "name" VARCHAR(64) NOT NULL, "role" VARCHAR(16) NOT NULL, "source" VARCHAR(16) NOT NULL, "created_by" VARCHAR(128) NOT NULL, "created_at" DATETIME NOT NULL, "revoked_by" VARCHAR(128), "revoked_at" DATETIME)',
            'CREATE UNIQUE INDEX IF NOT EXISTS "api_token_digest" ON "api_token" ("digest")',
            'CREATE TABLE IF NOT EXISTS "revoked_session" ("session_id" VARCHAR(32) NOT NULL PRIMARY KEY, "expires_at" DATETIME NOT NULL)',
            'CREATE INDEX IF NOT EXISTS "revoked_session_expires_at" ON "revoked_session" ("expires_at")',
        ),
        "postgresql": (
            'CREATE TABLE IF NOT EXISTS "api_token" ("id" SERIAL NOT NULL PRIMARY KEY, "digest" VARCHAR(64) NOT NULL, "name" VARCHAR(64) NOT NULL, "role" VARCHAR(16) NOT NULL, "source" VARCHAR(16) NOT NULL, "created_by" VARCHAR(128) NOT NULL, "created_at" TIMESTAMP NOT NULL, "revoked_by" VARCHAR(128), "revoked_at" TIMESTAMP)',
            'CREATE UNIQUE INDEX IF NOT EXISTS "api_token_digest" ON "api_token" ("digest")',
            'CREATE TABLE IF NOT EXISTS "revoked_session" ("session_id" VARCHAR(32) NOT NULL PRIMARY KEY, "expires_at" TIMESTAMP NOT NULL)',
            'CREATE INDEX IF NOT EXISTS "revoked_session_expires_at" ON "revoked_session" ("expires_at")',
        ),
    },
    3: {  # Maintained daily utilisation per user.
        "sqlite": (
            'CREATE TABLE IF NOT EXISTS "daily_peak" ("user_id" INTEGER NOT NULL PRIMARY KEY, "day" INTEGER NOT NULL, "rank" REAL NOT NULL, "username" VARCHAR(255) NOT NULL, FOREIGN KEY ("user_id") REFERENCES "user" ("id") ON DELETE CASCADE)',
        ),
        "postgresql": (
            'CREATE TABLE IF NOT EXISTS "daily_peak" ("user_id" INTEGER NOT NULL PRIMARY KEY, "day" BIGINT NOT NULL, "rank" REAL NOT NULL, "username" VARCHAR(255) NOT NULL, FOREIGN KEY ("user_id") REFERENCES "user" ("id") ON DELETE CASCADE)',
        ),
    },
}
