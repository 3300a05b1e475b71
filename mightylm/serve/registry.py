"""Personal adapters: a registry of users, their API keys and their adapters, in SQLite (WAL mode) inside a state
directory that also holds the adapter files, so that records and files live and die together.

    STATE/registry.db                       users, keys (sha256 digests, never the keys), adapter records
                                            (or, for several server processes, the same tables in PostgreSQL:
                                            Registry(STATE, url="postgresql://..."), files still under STATE)
    STATE/adapters/OWNER/NAME/vVERSION/     the files a record points to (copied in when registered)
    STATE/logs/OWNER.jsonl                  conversations of users who opted in (the server appends)

An adapter record: owner, name, version, the fingerprint of the base it was trained on (adapters.files:
config + embedding rows; an adapter for another base is refused), kind (LoRA, prompt tuning, P-tuning),
status (candidate -> live -> retired), created, parent version, the run that made it, its evaluation results,
and whether an admin shared it with everyone. At most one version of an adapter is live; the database
enforces it (a partial unique index), so concurrent promotions cannot leave two.

Who may do what: a user sees, uses and deletes only their own adapters and the shared ones (shared ones are
used, not changed); an admin manages all. A refusal about another user's adapter says "not found", the same
as for one that does not exist, so names never leak (NotFound -> 404, Forbidden -> 403).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mightylm.errors import MightyError

SCHEMA_VERSION = 1
# One schema for SQLite and PostgreSQL ({id}: the auto-numbered key's type in each)
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, admin INTEGER NOT NULL DEFAULT 0, log_conversations INTEGER NOT NULL DEFAULT 0,
    created DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    digest TEXT PRIMARY KEY, owner TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    created DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (
    id {id}, owner TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE, name TEXT NOT NULL,
    version INTEGER NOT NULL, base TEXT NOT NULL, kind TEXT NOT NULL, path TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('candidate', 'live', 'retired')), shared INTEGER NOT NULL DEFAULT 0,
    created DOUBLE PRECISION NOT NULL, promoted DOUBLE PRECISION, parent INTEGER, run TEXT, evaluation TEXT,
    UNIQUE (owner, name, version));
CREATE UNIQUE INDEX IF NOT EXISTS one_live ON adapters (owner, name) WHERE status = 'live'
"""
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
BUSY_SECONDS = 5.0


class RegistryError(MightyError, ValueError):
    """The registry cannot do what was asked; the message says why (and names the file for a bad database)."""


class NotFound(RegistryError):
    """No such user or adapter visible to the one asking (also said for another user's adapter)."""


class Forbidden(RegistryError):
    """The one asking may see it but not do this (a user changing a shared adapter, a non-admin's admin call)."""


@dataclass(frozen=True)
class User:
    name: str
    admin: bool
    log_conversations: bool


@dataclass(frozen=True)
class Record:
    id: int
    owner: str
    name: str
    version: int
    base: str
    kind: str
    path: str
    status: str
    shared: bool
    created: float
    promoted: float | None
    parent: int | None
    run: str | None
    evaluation: dict | None

    def public(self) -> dict:
        """What the API and the CLI show (the file path stays on the server)."""
        return {"owner": self.owner, "name": self.name, "version": self.version, "kind": self.kind,
                "status": self.status, "shared": self.shared, "created": self.created, "promoted": self.promoted,
                "parent": self.parent, "run": self.run, "evaluation": self.evaluation, "base": self.base}


class Registry:
    """The registry in `state` (created if missing), its tables in `state`/registry.db or, given `url`
    ("postgresql://..."), in that PostgreSQL database. Safe to share between threads and processes: every call is
    one short transaction on its own connection, and writers take the tables in turn."""

    def __init__(self, state: str | Path, url: str | None = None):
        self.state = Path(state)
        self.url = url
        self.db = url or self.state / "registry.db"  # what error messages name
        self.state.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one writer per process at a time; the database serialises processes
        with self._write() as con:
            for statement in SCHEMA.format(id="BIGSERIAL PRIMARY KEY" if url else "INTEGER PRIMARY KEY").split(";"):
                con.execute(statement)
            row = con.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                con.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise RegistryError(f"{self.db}: written by a newer mightylm (schema {row[0]}, this one knows "
                                    f"{SCHEMA_VERSION}); upgrade mightylm")

    # ---- connections ----

    @contextmanager
    def _connect(self):
        errors = _database_errors(self.url)
        try:
            con = _Postgres(self.url) if self.url else _SQLite(self.db)
        except errors as e:
            raise self._explain(e) from None
        try:
            yield con
        except errors as e:
            raise self._explain(e) from None
        finally:
            con.close()

    def _explain(self, e: Exception) -> RegistryError:
        text = str(e).strip()
        if "locked" in text or "busy" in text or "lock timeout" in text:
            return RegistryError(f"{self.db}: locked by another process for over {BUSY_SECONDS:.0f} s ({text}); "
                                 "retry, or stop the process that holds it")
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            return RegistryError(f"{self.db}: not a readable registry database ({text}); it was left as it is. Move "
                                 "it away to start an empty registry, or restore it from a backup")
        if self.url and ("connect" in text or "connection" in text):
            return RegistryError(f"cannot reach the registry database at {_safe(self.url)} ({text})")
        return RegistryError(f"{_safe(str(self.db))}: {text}")

    @contextmanager
    def _write(self):
        """One write transaction, taken whole or waited for, never interleaved with another writer's."""
        with self._lock, self._connect() as con:
            con.begin()
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    # ---- users and keys ----

    def add_user(self, name: str, *, admin: bool = False, log_conversations: bool = False) -> str:
        """Create a user; returns their first API key (shown once: only its digest is kept)."""
        _check_name(name, "user")
        with self._write() as con:
            if con.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise RegistryError(f"user {name!r} exists already")
            con.execute("INSERT INTO users VALUES (?, ?, ?, ?)", (name, int(admin), int(log_conversations), time.time()))
        return self.add_key(name)

    def add_key(self, user: str) -> str:
        key = "mk-" + secrets.token_urlsafe(24)
        with self._write() as con:
            if not con.execute("SELECT 1 FROM users WHERE name = ?", (user,)).fetchone():
                raise NotFound(f"no user {user!r}")
            con.execute("INSERT INTO keys VALUES (?, ?, ?)", (_digest(key), user, time.time()))
        return key

    def user_of_key(self, key: str) -> User | None:
        with self._connect() as con:
            row = con.execute("SELECT u.name, u.admin, u.log_conversations FROM keys k JOIN users u ON u.name = k.owner "
                              "WHERE k.digest = ?", (_digest(key),)).fetchone()
        return None if row is None else User(row[0], bool(row[1]), bool(row[2]))

    def user(self, name: str) -> User:
        with self._connect() as con:
            row = con.execute("SELECT name, admin, log_conversations FROM users WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no user {name!r}")
        return User(row[0], bool(row[1]), bool(row[2]))

    def users(self) -> list[User]:
        with self._connect() as con:
            rows = con.execute("SELECT name, admin, log_conversations FROM users ORDER BY name").fetchall()
        return [User(r[0], bool(r[1]), bool(r[2])) for r in rows]

    def set_logging(self, actor: User, user: str, on: bool) -> None:
        """Opt a user in or out of conversation logging (themselves, or anyone for an admin)."""
        if actor.name != user and not actor.admin:
            raise NotFound(f"no user {user!r}")
        with self._write() as con:
            if con.execute("UPDATE users SET log_conversations = ? WHERE name = ?", (int(on), user)).rowcount == 0:
                raise NotFound(f"no user {user!r}")

    def log_path(self, user: str) -> Path:
        return self.state / "logs" / f"{user}.jsonl"

    def forget_user(self, actor: User, user: str) -> dict:
        """Remove a user and everything of theirs: keys, adapter records, adapter files, conversation logs.
        Returns what was removed."""
        if actor.name != user and not actor.admin:
            raise NotFound(f"no user {user!r}")
        with self._write() as con:
            n = con.execute("SELECT COUNT(*) FROM adapters WHERE owner = ?", (user,)).fetchone()[0]
            if con.execute("DELETE FROM users WHERE name = ?", (user,)).rowcount == 0:  # keys, adapters cascade
                raise NotFound(f"no user {user!r}")
        shutil.rmtree(self.state / "adapters" / user, ignore_errors=True)
        log = self.log_path(user)
        had_log = log.exists()
        log.unlink(missing_ok=True)
        with self._connect() as con:  # rewrite the file without the deleted rows' pages (not just free-listed)
            con.vacuum()
        return {"user": user, "adapters": n, "log": had_log}

    # ---- adapters ----

    def register(self, actor: User, name: str, source: str | Path, base: str, *, owner: str | None = None,
                 parent: int | None = None, run: str | None = None, evaluation: dict | None = None) -> Record:
        """Copy the adapter directory `source` into the store as the next version of `owner`'s adapter `name`
        (owner: the actor, or anyone for an admin), status candidate. `base` is the fingerprint of the base model
        the registry serves; an adapter recording another base is refused."""
        from mightylm.adapters import kind_of, read_adapter_config
        from mightylm.adapters.files import recorded_base

        owner = owner or actor.name
        if owner != actor.name and not actor.admin:
            raise Forbidden("only an admin registers adapters for another user")
        _check_name(name, "adapter")
        cfg = read_adapter_config(source)
        kind = kind_of(cfg, source).name
        made_for = recorded_base(source)
        if made_for and made_for != base:
            raise RegistryError(f"{source}: trained on another base model (fingerprint {made_for}; this registry "
                                f"serves {base}); train it on this base")
        self.user(owner)
        staging = self.state / "adapters" / owner / name / f".incoming-{secrets.token_hex(4)}"
        shutil.copytree(source, staging)
        try:
            with self._write() as con:
                version = con.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM adapters WHERE owner = ? AND name = ?",
                                      (owner, name)).fetchone()[0]
                final = staging.parent / f"v{version}"
                con.execute("INSERT INTO adapters (owner, name, version, base, kind, path, status, created, parent, run, "
                            "evaluation) VALUES (?, ?, ?, ?, ?, ?, 'candidate', ?, ?, ?, ?)",
                            (owner, name, version, base, kind, str(final.relative_to(self.state)), time.time(), parent,
                             run, None if evaluation is None else json.dumps(evaluation)))
                staging.rename(final)  # inside the transaction: a failed insert leaves no directory behind
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.show(actor, name, owner=owner, version=version)

    def set_evaluation(self, actor: User, name: str, version: int, evaluation: dict, *, owner: str | None = None) -> None:
        record = self.show(actor, name, owner=owner, version=version)
        self._may_change(actor, record)
        with self._write() as con:
            con.execute("UPDATE adapters SET evaluation = ? WHERE id = ?", (json.dumps(evaluation), record.id))

    def list(self, actor: User, *, owner: str | None = None) -> list[Record]:
        """The adapters `actor` may see: their own and the shared ones (an admin: everyone's, or `owner`'s)."""
        with self._connect() as con:
            if actor.admin:
                rows = con.execute(f"SELECT {_COLUMNS} FROM adapters WHERE CAST(? AS TEXT) IS NULL OR owner = ? "
                                   "ORDER BY owner, name, version", (owner, owner)).fetchall()
            else:
                rows = con.execute(f"SELECT {_COLUMNS} FROM adapters WHERE (owner = ? OR shared = 1) AND "
                                   "(CAST(? AS TEXT) IS NULL OR owner = ?) ORDER BY owner, name, version",
                                   (actor.name, owner, owner)).fetchall()
        return [_record(r) for r in rows]

    def show(self, actor: User, name: str, *, owner: str | None = None, version: int | None = None) -> Record:
        """One version (default: the live one, else the newest) of an adapter `actor` may see."""
        versions = [r for r in self.list(actor, owner=owner) if r.name == name]
        if owner is None and versions:  # the actor's own first, then a shared one
            mine = [r for r in versions if r.owner == actor.name]
            versions = mine or [r for r in versions if r.owner == versions[0].owner]
        if version is not None:
            versions = [r for r in versions if r.version == version]
        else:
            versions = [r for r in versions if r.status == "live"] or versions[-1:]
        if not versions:
            raise NotFound(f"adapter {name!r}" + (f" version {version}" if version else "") + " not found")
        return versions[0]

    def resolve(self, actor: User, name: str) -> Record:
        """The live version of the adapter a request names ("base:NAME"): the actor's own, else a shared one."""
        record = self.show(actor, name)
        if record.status != "live":
            raise NotFound(f"adapter {name!r} has no live version (promote one: mighty adapters promote)")
        return record

    def promote(self, actor: User, name: str, version: int, *, owner: str | None = None) -> Record:
        """Make `version` live; the live one before it becomes retired (one transaction)."""
        record = self.show(actor, name, owner=owner, version=version)
        self._may_change(actor, record)
        with self._write() as con:
            con.execute("UPDATE adapters SET status = 'retired' WHERE owner = ? AND name = ? AND status = 'live'",
                        (record.owner, name))
            if con.execute("UPDATE adapters SET status = 'live', promoted = ? WHERE id = ?",
                           (time.time(), record.id)).rowcount == 0:
                raise NotFound(f"adapter {name!r} version {version} not found")  # deleted meanwhile
        return self.show(actor, name, owner=record.owner, version=version)

    def rollback(self, actor: User, name: str, *, owner: str | None = None) -> Record:
        """Make the previously live version live again (the one promoted most recently before the live one); the
        live one becomes retired. Returns the version now live. (A second rollback undoes the first.)"""
        with self._write() as con:
            live = self._visible_live(con, actor, name, owner)
            previous = con.execute(f"SELECT {_COLUMNS} FROM adapters WHERE owner = ? AND name = ? AND status = 'retired' "
                                   "AND promoted IS NOT NULL AND id != ? ORDER BY promoted DESC LIMIT 1",
                                   (live.owner, name, live.id)).fetchone()
            if previous is None:
                raise RegistryError(f"adapter {name!r}: no earlier live version to roll back to")
            con.execute("UPDATE adapters SET status = 'retired' WHERE id = ?", (live.id,))
            con.execute("UPDATE adapters SET status = 'live', promoted = ? WHERE id = ?", (time.time(), previous[0]))
        return self.show(actor, name, owner=live.owner, version=previous[3])

    def _visible_live(self, con, actor: User, name: str, owner: str | None) -> Record:
        owner = owner or actor.name
        if owner != actor.name and not actor.admin:
            raise NotFound(f"adapter {name!r} not found")
        row = con.execute(f"SELECT {_COLUMNS} FROM adapters WHERE owner = ? AND name = ? AND status = 'live'",
                          (owner, name)).fetchone()
        if row is None:
            raise NotFound(f"adapter {name!r} has no live version")
        return _record(row)

    def delete(self, actor: User, name: str, *, owner: str | None = None, version: int | None = None) -> list[int]:
        """Delete one version, or every version, of an adapter: records and files. Returns the versions deleted."""
        records = [r for r in self.list(actor, owner=owner or actor.name) if r.name == name]
        if version is not None:
            records = [r for r in records if r.version == version]
        if not records:
            raise NotFound(f"adapter {name!r}" + (f" version {version}" if version else "") + " not found")
        for r in records:
            self._may_change(actor, r)
        with self._write() as con:
            con.executemany("DELETE FROM adapters WHERE id = ?", [(r.id,) for r in records])
        for r in records:
            shutil.rmtree(self.state / r.path, ignore_errors=True)
        return [r.version for r in records]

    def publish(self, actor: User, name: str, *, owner: str, shared: bool = True) -> None:
        """Share (or stop sharing) an adapter's versions with every user: admins only."""
        if not actor.admin:
            raise Forbidden("only an admin shares adapters with everyone")
        with self._write() as con:
            if con.execute("UPDATE adapters SET shared = ? WHERE owner = ? AND name = ?",
                           (int(shared), owner, name)).rowcount == 0:
                raise NotFound(f"adapter {name!r} of {owner!r} not found")

    def files(self, record: Record) -> Path:
        return self.state / record.path

    def _may_change(self, actor: User, record: Record) -> None:
        if record.owner != actor.name and not actor.admin:
            raise Forbidden(f"adapter {record.name!r} is shared with you by an admin: you may use it, not change it")


class _SQLite:
    def __init__(self, path: Path):
        self.con = sqlite3.connect(path, timeout=BUSY_SECONDS, isolation_level=None)
        self.con.execute("PRAGMA journal_mode = WAL")
        self.con.execute("PRAGMA foreign_keys = ON")

    def begin(self):
        self.con.execute("BEGIN IMMEDIATE")  # the write lock now, not at the first write

    def execute(self, sql: str, params=()):
        return self.con.execute(sql, params)

    def executemany(self, sql: str, rows):
        self.con.executemany(sql, rows)

    def vacuum(self):
        self.con.execute("VACUUM")
        self.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # and empty the write-ahead log that held them

    def close(self):
        self.con.close()


class _Postgres:
    """The same calls over psycopg: '?' placeholders become '%s'; a writer locks the tables it changes."""

    def __init__(self, url: str):
        import psycopg

        self.con = psycopg.connect(url, autocommit=True, connect_timeout=int(BUSY_SECONDS))
        self.con.execute(f"SET lock_timeout = {int(BUSY_SECONDS * 1000)}")

    def begin(self):
        self.con.execute("BEGIN")
        if self.con.execute("SELECT to_regclass('adapters')").fetchone()[0] is not None:
            self.con.execute("LOCK TABLE users, keys, adapters IN SHARE ROW EXCLUSIVE MODE")

    def execute(self, sql: str, params=()):
        return self.con.execute(sql.replace("?", "%s"), params) if sql.strip() else self.con.execute("SELECT 1")

    def executemany(self, sql: str, rows):
        with self.con.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), rows)

    def vacuum(self):
        self.con.execute("VACUUM users, keys, adapters")

    def close(self):
        self.con.close()


def _database_errors(url: str | None) -> tuple:
    if not url:
        return (sqlite3.DatabaseError,)
    try:
        import psycopg
    except ImportError:
        raise RegistryError(f"{_safe(url)}: a PostgreSQL registry needs psycopg: pip install 'psycopg[binary]'") from None
    return (psycopg.Error,)


def _safe(url: str) -> str:
    """A connection URL without its password, for messages."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


_COLUMNS = ("id, owner, name, version, base, kind, path, status, shared, created, promoted, parent, run, evaluation")


def _record(row) -> Record:
    return Record(*row[:8], bool(row[8]), row[9], row[10], row[11], row[12],
                  None if row[13] is None else json.loads(row[13]))


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise RegistryError(f"{what} name {name!r}: 1-64 letters, digits, '-' or '_', starting with a letter or digit")
