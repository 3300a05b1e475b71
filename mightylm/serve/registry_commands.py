"""`mighty users ...` and `mighty adapters ...`: the registry of personal adapters (serve/registry.py) from the
command line. Whoever can write the state directory manages it as an admin; `mighty serve --registry DIR`
serves it, and users manage their own adapters over HTTP under /admin/registry. With MIGHTY_REGISTRY_DB set to a
PostgreSQL URL (postgresql://user@host/db), the records live there (shared by several servers) and the files
under --registry."""

from __future__ import annotations

import json

from mightylm.options import Fraction, PositiveFloat, PositiveInt

LOCAL = "(local admin)"  # the actor of command-line calls: filesystem access is admin access


REGISTRY_DB_ENV = "MIGHTY_REGISTRY_DB"


def _open(registry: str):
    import os

    from mightylm.serve.registry import Registry, User

    return Registry(registry, url=os.environ.get(REGISTRY_DB_ENV) or None), User(LOCAL, admin=True,
                                                                                    log_conversations=False)


def users_add(registry: str, user: str, admin: bool = False, log_conversations: bool = False) -> None:
    """Create a user and print their API key (shown once; only its sha256 is stored).

    Args:
        registry: The state directory (created if missing).
        user: The user's name: letters, digits, '-' or '_'.
        admin: An admin key manages every user's adapters and loads adapters from server paths.
        log_conversations: Opt the user in to conversation logging (their chats appended to logs/USER.jsonl,
            the data `mighty personalize` trains on); off unless asked.
    """
    reg, _ = _open(registry)
    print(reg.add_user(user, admin=admin, log_conversations=log_conversations))


def users_key(registry: str, user: str) -> None:
    """Give a user another API key and print it (the old ones keep working).

    Args:
        registry: The state directory.
        user: The user.
    """
    reg, _ = _open(registry)
    print(reg.add_key(user))


def users_list(registry: str) -> None:
    """List the users, whether each is an admin and has opted in to logging.

    Args:
        registry: The state directory.
    """
    reg, _ = _open(registry)
    for u in reg.users():
        print(f"{u.name}\tadmin={str(u.admin).lower()}\tlog_conversations={str(u.log_conversations).lower()}")


def users_forget(registry: str, user: str) -> None:
    """Forget a user: their keys, adapter records, adapter files and conversation logs are deleted.

    Args:
        registry: The state directory.
        user: The user.
    """
    reg, admin = _open(registry)
    gone = reg.forget_user(admin, user)
    print(f"forgot {gone['user']}: {gone['adapters']} adapter versions" + (" and their conversation log" if gone["log"]
                                                                            else ""))


def users_logging(registry: str, user: str, enabled: bool) -> None:
    """Opt a user in to (or out of) conversation logging.

    Args:
        registry: The state directory.
        user: The user.
        enabled: true: the server appends their chats to logs/USER.jsonl; false: it stops (the log stays until
            `mighty users forget`).
    """
    reg, admin = _open(registry)
    reg.set_logging(admin, user, enabled)
    print(f"{user}: log_conversations={str(enabled).lower()}")


def adapters_register(registry: str, user: str, name: str, adapter: str, model: str = "smollm2-135m-instruct",
                      run: str | None = None) -> None:
    """Copy an adapter directory into the registry as the next version of USER's adapter NAME (a candidate).

    Args:
        registry: The state directory.
        user: The owner.
        name: The adapter's name (requests use "MODEL:NAME").
        adapter: The adapter directory (LoRA, prompt tuning or P-tuning, PEFT's layout).
        model: The base model the server runs: an adapter recorded as trained on another base is refused.
        run: The training run that made it (a path or a note), kept with the record.
    """
    import mightylm
    from mightylm.adapters.files import base_fingerprint

    reg, admin = _open(registry)
    base, _ = mightylm.load(model)
    record = reg.register(admin, name, adapter, base_fingerprint(base), owner=user, run=run)
    print(f"registered {user}/{name} version {record.version} ({record.kind}, candidate); make it live: mighty "
          f"adapters promote --registry {registry} --user {user} --name {name} --version {record.version}")


def adapters_list(registry: str, user: str | None = None) -> None:
    """List adapter versions: everyone's, or one user's.

    Args:
        registry: The state directory.
        user: Only this owner's.
    """
    reg, admin = _open(registry)
    for r in reg.list(admin, owner=user):
        print(f"{r.owner}/{r.name}\tv{r.version}\t{r.status}\t{r.kind}" + ("\tshared" if r.shared else ""))


def adapters_show(registry: str, user: str, name: str, version: PositiveInt | None = None) -> None:
    """Print one version's record as JSON (default: the live one, else the newest).

    Args:
        registry: The state directory.
        user: The owner.
        name: The adapter.
        version: The version.
    """
    reg, admin = _open(registry)
    print(json.dumps(reg.show(admin, name, owner=user, version=version).public(), indent=2))


def adapters_promote(registry: str, user: str, name: str, version: PositiveInt) -> None:
    """Make a version live (the live one before it is retired); servers use it from their next request.

    Args:
        registry: The state directory.
        user: The owner.
        name: The adapter.
        version: The version to make live.
    """
    reg, admin = _open(registry)
    reg.promote(admin, name, version, owner=user)
    print(f"{user}/{name}: version {version} is live")


def adapters_rollback(registry: str, user: str, name: str) -> None:
    """Make the previously live version live again.

    Args:
        registry: The state directory.
        user: The owner.
        name: The adapter.
    """
    reg, admin = _open(registry)
    print(f"{user}/{name}: version {reg.rollback(admin, name, owner=user).version} is live")


def adapters_delete(registry: str, user: str, name: str, version: PositiveInt | None = None) -> None:
    """Delete one version, or all versions, of an adapter: records and files.

    Args:
        registry: The state directory.
        user: The owner.
        name: The adapter.
        version: Only this version.
    """
    reg, admin = _open(registry)
    print(f"{user}/{name}: deleted versions {reg.delete(admin, name, owner=user, version=version)}")


def adapters_share(registry: str, user: str, name: str, shared: bool = True) -> None:
    """Share an adapter with every user (they may use it, not change it), or stop sharing it.

    Args:
        registry: The state directory.
        user: The owner.
        name: The adapter.
        shared: false stops sharing.
    """
    reg, admin = _open(registry)
    reg.publish(admin, name, owner=user, shared=shared)
    print(f"{user}/{name}: shared={str(shared).lower()}")


def personalize(registry: str, user: str, model: str = "smollm2-135m-instruct", name: str = "personal",
                steps: PositiveInt = 60, rank: PositiveInt = 8, lr: PositiveFloat = 2e-3,
                min_conversations: PositiveInt = 8, held_out: Fraction = 0.2, max_general_rise: PositiveFloat = 0.05,
                max_bias_shift: PositiveFloat = 0.1, max_gap_rise: PositiveFloat = 0.25) -> None:
    """Train a LoRA on a user's own logged conversations, register it, and make it live only if it passes.

    The candidate must lower the user's held-out perplexity (their last conversations), keep the perplexity on
    the embedded held-out text within --max_general_rise, and leave the bias probe (mighty eval bias's paired
    sentences) within --max_bias_shift and --max_gap_rise of the base. The report says which check failed; a
    candidate that failed stays registered (not live) with its evaluation.

    Args:
        registry: The state directory (its logs/USER.jsonl holds the conversations of users who opted in).
        user: The user.
        model: The base model the server runs.
        name: The adapter's name (requests use "MODEL:NAME"); each run adds a version.
        steps: Training steps (batches of 4 conversations).
        rank: LoRA rank (alpha is twice it).
        lr: Peak learning rate.
        min_conversations: Refuse with fewer logged conversations than this.
        held_out: Share of the user's conversations (the latest) kept for evaluation.
        max_general_rise: Largest allowed relative rise of the general perplexity.
        max_bias_shift: Largest allowed move of the stereotype share away from 0.5.
        max_gap_rise: Largest allowed rise of the mean stereotype gap, in nats.
    """
    from mightylm.serve.personalize import Gate, personalize as run

    reg, admin = _open(registry)
    outcome = run(reg, admin, user, model=model, name=name, steps=steps, r=rank, lr=lr,
                  min_conversations=min_conversations, held_out=held_out,
                  gate=Gate(max_general_rise, max_bias_shift, max_gap_rise))
    print(outcome.report(user, name))


VERBS = {
    "users": {"_help": "Users of a personal-adapter registry and their API keys: add, key, list, forget, logging.",
              "add": users_add, "key": users_key, "list": users_list, "forget": users_forget, "logging": users_logging},
    "adapters": {"_help": "Personal adapters in a registry: register, list, show, promote, rollback, delete, share.",
                 "register": adapters_register, "list": adapters_list, "show": adapters_show,
                 "promote": adapters_promote, "rollback": adapters_rollback, "delete": adapters_delete,
                 "share": adapters_share},
    "personalize": personalize,
}
