"""The personal-adapter registry (serve/registry.py): versions and promotion, ownership (every path), a restart,
concurrent changes, "forget me", and the bad inputs (another base, a corrupt or locked database)."""

import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from mightylm.adapters.files import base_fingerprint, stamp_base
from mightylm.serve.registry import Forbidden, NotFound, Registry, RegistryError

from conftest import random_lora, tiny


@pytest.fixture(scope="module")
def base():
    return tiny()


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """Two LoRA adapters trained (randomly) on `base`, and one on another base of the same shape."""
    root = tmp_path_factory.mktemp("adapters")
    for name in ("a", "b"):
        random_lora(base, ("q_proj", "v_proj"), root / name, base_model="tiny")
        stamp_base(base, root / name)
    other = tiny(seed=1)
    random_lora(other, ("q_proj",), root / "other", base_model="tiny seed 1")
    stamp_base(other, root / "other")
    return root


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of our own on a free loopback port (Debian's server binaries; as root, run as the postgres
    user), for the registry's tests; skipped, saying why, where it cannot start."""
    bindir = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (Debian package postgresql; `make test` installs it where apt works)")
    pytest.importorskip("psycopg", reason="psycopg is in the test extras: make install")
    data = Path(tempfile.mkdtemp(prefix="mightylm-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(data, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run(*args):
        return subprocess.run([*as_user, str(bindir / args[0]), *args[1:]], capture_output=True, text=True, timeout=120)

    done = run("initdb", "-D", str(data / "db"), "-A", "trust", "-U", "postgres", "--no-sync")
    if done.returncode == 0:
        done = run("pg_ctl", "-D", str(data / "db"), "-w", "-l", str(data / "log"), "start", "-o",
                   f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off")
    if done.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        pytest.skip(f"could not start PostgreSQL: {(done.stderr or done.stdout)[-300:]}")
    yield f"postgresql://postgres@127.0.0.1:{port}"
    run("pg_ctl", "-D", str(data / "db"), "-m", "immediate", "stop")
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def open_registry(request, tmp_path):
    """Registry(state) on SQLite, or on a fresh database of the test's PostgreSQL server."""
    if request.param == "sqlite":
        return lambda: Registry(tmp_path)
    import psycopg

    server = request.getfixturevalue("postgres")
    name = f"t{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    return lambda: Registry(tmp_path, url=f"{server}/{name}")


def people(registry):
    keys = {name: registry.add_user(name, admin=name == "root") for name in ("alice", "bob", "root")}
    return {name: registry.user_of_key(key) for name, key in keys.items()}, keys


def test_versions_promotion_rollback_and_a_restart(open_registry, base, adapters):
    registry = open_registry()
    users, keys = people(registry)
    alice, fp = users["alice"], base_fingerprint(base)
    v1 = registry.register(alice, "style", adapters / "a", fp, run="run-1")
    v2 = registry.register(alice, "style", adapters / "b", fp, parent=v1.version, evaluation={"ppl": 12.5})
    assert (v1.version, v1.status, v2.version, v2.parent, v2.evaluation) == (1, "candidate", 2, 1, {"ppl": 12.5})
    assert (registry.files(v2) / "adapter_model.safetensors").exists() and v2.kind == "lora"
    with pytest.raises(NotFound, match="no live version"):
        registry.resolve(alice, "style")
    registry.promote(alice, "style", 1)
    assert registry.promote(alice, "style", 2).status == "live"
    assert [r.status for r in registry.list(alice)] == ["retired", "live"]
    assert registry.rollback(alice, "style").version == 1
    assert registry.resolve(alice, "style").version == 1
    assert registry.rollback(alice, "style").version == 2  # the version live before the live one: v2 again
    assert registry.rollback(alice, "style").version == 1
    again = open_registry()  # a restart: everything is still there, keys included
    assert again.user_of_key(keys["alice"]) == alice and again.user_of_key("mk-wrong") is None
    assert [(r.version, r.status) for r in again.list(alice)] == [(1, "live"), (2, "retired")]
    assert again.resolve(alice, "style").run == "run-1"


def test_a_user_never_reaches_another_users_adapters(open_registry, base, adapters):
    registry = open_registry()
    users, _ = people(registry)
    alice, bob, root = users["alice"], users["bob"], users["root"]
    fp = base_fingerprint(base)
    registry.register(alice, "style", adapters / "a", fp)
    with pytest.raises(RegistryError, match="no earlier live version"):
        registry.promote(alice, "style", 1) and registry.rollback(alice, "style")  # only one version was ever live
    assert registry.list(bob) == []
    attempts = [lambda n: registry.show(bob, n), lambda n: registry.resolve(bob, n),
                lambda n: registry.show(bob, n, owner="alice"), lambda n: registry.delete(bob, n),
                lambda n: registry.delete(bob, n, owner="alice"), lambda n: registry.rollback(bob, n, owner="alice"),
                lambda n: registry.promote(bob, n, 1, owner="alice")]
    for attempt in attempts:  # each refusal reads exactly as for a name nobody has: nothing leaks
        with pytest.raises(NotFound) as real:
            attempt("style")
        with pytest.raises(NotFound) as ghost:
            attempt("ghost")
        assert str(real.value) == str(ghost.value).replace("ghost", "style")
    with pytest.raises(Forbidden):
        registry.register(bob, "style", adapters / "b", fp, owner="alice")  # training into alice's name
    with pytest.raises(NotFound):
        registry.forget_user(bob, "alice")
    assert [r.owner for r in registry.list(root)] == ["alice"]  # an admin sees everyone's
    registry.publish(root, "style", owner="alice")  # shared by an admin: bob may use it, not change it
    assert registry.resolve(bob, "style").owner == "alice"
    with pytest.raises(Forbidden, match="you may use it, not change it"):
        registry.delete(bob, "style", owner="alice")
    with pytest.raises(Forbidden):
        registry.publish(bob, "style", owner="alice")
    registry.register(bob, "style", adapters / "b", fp)  # bob's own "style" comes before the shared one
    registry.promote(bob, "style", 1)
    assert registry.resolve(bob, "style").owner == "bob" and registry.resolve(alice, "style").owner == "alice"


def test_an_adapter_for_another_base_and_bad_names_are_refused(tmp_path, base, adapters):
    registry = Registry(tmp_path)
    alice = people(registry)[0]["alice"]
    with pytest.raises(RegistryError, match="trained on another base model"):
        registry.register(alice, "x", adapters / "other", base_fingerprint(base))
    for bad in ("", "a/b", "../up", "x" * 65, "a:b"):
        with pytest.raises(RegistryError, match="letters, digits"):
            registry.register(alice, bad, adapters / "a", base_fingerprint(base))
    assert registry.list(alice) == [] and not list((tmp_path / "adapters").glob("*/*/v*"))


def test_concurrent_promotions_rollbacks_and_deletions_keep_one_live_version(open_registry, tmp_path, base, adapters):
    registry = open_registry()
    users, _ = people(registry)
    alice, root = users["alice"], users["root"]
    fp = base_fingerprint(base)
    for _ in range(6):
        registry.register(alice, "style", adapters / "a", fp)
    errors, done = [], []

    def worker(i):
        other = open_registry()  # as another server process would: its own connections
        for step in range(12):
            try:
                kind = (i + step) % 4
                if kind == 0:
                    other.promote(alice, "style", 1 + (i * 7 + step) % 6)
                elif kind == 1:
                    other.rollback(root, "style", owner="alice")
                elif kind == 2 and step > 8:
                    other.delete(alice, "style", version=1 + step % 6)
                else:
                    other.register(alice, "style", adapters / "b", fp)
                done.append(kind)
            except (NotFound, RegistryError) as e:  # nothing to roll back to, a version deleted meanwhile
                if "locked" in str(e):
                    errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and {0, 1, 2, 3} <= set(done)  # every kind of change happened, none hit a lock
    records = registry.list(root)
    versions = [r.version for r in records]
    assert len(versions) == len(set(versions)) and sum(r.status == "live" for r in records) <= 1
    on_disk = sorted(int(p.name[1:]) for p in (tmp_path / "adapters" / "alice" / "style").iterdir())
    assert on_disk == sorted(versions)  # every record has its files and no files lack a record
    if registry.url is None:
        with sqlite3.connect(tmp_path / "registry.db") as con:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_forgetting_a_user_leaves_nothing_of_theirs(open_registry, tmp_path, base, adapters):
    registry = open_registry()
    users, keys = people(registry)
    alice, bob = users["alice"], users["bob"]
    fp = base_fingerprint(base)
    for name in ("style", "terse"):
        registry.register(alice, name, adapters / "a", fp, run="alice-run")
    registry.register(bob, "style", adapters / "b", fp)
    registry.log_path("alice").parent.mkdir(parents=True, exist_ok=True)
    registry.log_path("alice").write_text('{"messages": [{"role": "user", "content": "alice-secret"}]}\n')
    gone = registry.forget_user(alice, "alice")
    assert gone == {"user": "alice", "adapters": 2, "log": True}
    assert registry.user_of_key(keys["alice"]) is None
    assert not (tmp_path / "adapters" / "alice").exists() and not registry.log_path("alice").exists()
    leftovers = [p for p in tmp_path.rglob("*") if "alice" in p.name]
    assert leftovers == []
    for file in tmp_path.glob("registry.db*"):  # the database itself (and its WAL) holds no trace of her
        assert b"alice" not in file.read_bytes(), file
    if registry.url:  # PostgreSQL: no row anywhere names her
        import psycopg

        with psycopg.connect(registry.url) as con:
            for table, column in (("users", "name"), ("keys", "owner"), ("adapters", "owner")):
                assert con.execute(f"SELECT COUNT(*) FROM {table} WHERE {column} = 'alice'").fetchone()[0] == 0
    assert [r.owner for r in registry.list(bob)] == ["bob"]


def test_a_corrupt_or_locked_database_is_reported_not_reset(tmp_path, monkeypatch):
    import mightylm.serve.registry as module

    (tmp_path / "registry.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="registry.db: not a readable registry database"):
        Registry(tmp_path)
    assert (tmp_path / "registry.db").read_bytes() == b"this is not a database" * 100  # left as it was
    locked = tmp_path / "locked"
    registry = Registry(locked)
    holder = sqlite3.connect(locked / "registry.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    monkeypatch.setattr(module, "BUSY_SECONDS", 0.2)
    try:
        with pytest.raises(RegistryError, match="locked by another process"):
            registry.add_user("carol")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    registry.add_user("carol")
