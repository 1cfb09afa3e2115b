"""Accounts, groups and visibility on a shared MongoDB: the server decides who sees what.

Why databases, not views or a client-side filter
-------------------------------------------------
MongoDB grants actions on whole databases or collections, never on single documents. Measured on the
embedded server (SecantusDB 0.7.0b3 with ``--auth``, ``../shared/guides/embedded-mongodb.md`` and
``tests/test_db_access.py``): SCRAM users, per-database privileges and action-level custom roles are enforced;
privileges scoped to one collection (hence role-filtered views) are not, and ``$$USER_ROLES`` is unknown.
So every visibility level is a *database*, and what a user may do there is a privilege the server checks:

================================  ===================  ===========================================
database                          its owner may        others may
================================  ===================  ===========================================
``mlmd_u_<user>`` private         read, write, delete  nothing
``mlmd_g_<group>_<user>`` group   read, write, delete  read, while a member of ``<group>``
``mlmd_e_<user>`` embargoed       read, insert         nothing (released to ``mlmd_p_`` when due)
``mlmd_p_<user>`` public          read, insert         read (nobody updates or deletes: append-only)
``mlmd_directory``                read                 read (user and group names; admin writes)
================================  ===================  ===========================================

Ownership is *where a document lives*: the reader stamps ``owner``, ``visibility`` and ``group`` from the
database name, so a forged ``owner`` field is ignored. Each user's privileges sit on one custom role
``mlmd_user_<user>`` (plus the shared ``mlmd_public_reader``): the embedded server caches a session's
*roles* at login but reads a role's *privileges* on every command (measured), so leaving a group or being
deleted takes effect on the next query of an open session, not only at the next login.

Nobody but an administrator can create users, roles or views: the privileges list no ``createCollection``,
``createUser``, ``createRole`` or ``grantRole`` action, and ``system.users`` is not readable.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_plus, urlsplit

from pymongo.errors import OperationFailure

from mlmd_lab.errors import DatabaseError, MLMDError

if TYPE_CHECKING:
    from pymongo import MongoClient

DIRECTORY_DB = "mlmd_directory"
PUBLIC_ROLE = "mlmd_public_reader"
VISIBILITIES = ("private", "group", "public")
#: Names of users and groups: they become parts of database names (MongoDB allows no '.', '/', '$', space),
#: and '_' separates group from user in ``mlmd_g_<group>_<user>``, so names use letters, digits and '-'.
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{1,30}$")
MIN_PASSWORD = 12
#: NOMAD's longest embargo; a longer one is refused.
MAX_EMBARGO = timedelta(days=3 * 366)
DEFAULT_LICENCE = "CC-BY-4.0"
#: What each licence allows a potential trained on the data to be: ``derive`` False forbids training a
#: model on it (a model is an adaptation), ``commercial`` False is recorded and warned about.
LICENCES: dict[str, dict[str, bool]] = {
    "CC0-1.0": {"derive": True, "commercial": True, "attribution": False},
    "CC-BY-4.0": {"derive": True, "commercial": True, "attribution": True},
    "CC-BY-SA-4.0": {"derive": True, "commercial": True, "attribution": True},
    "CC-BY-NC-4.0": {"derive": True, "commercial": False, "attribution": True},
    "CC-BY-NC-SA-4.0": {"derive": True, "commercial": False, "attribution": True},
    "CC-BY-ND-4.0": {"derive": False, "commercial": True, "attribution": True},
    "CC-BY-NC-ND-4.0": {"derive": False, "commercial": False, "attribution": True},
}

#: What an owner may do in the own private and group databases: no createCollection (so no views), no
#: dropDatabase, no user or role administration. Collections are created by the first insert.
OWNER_ACTIONS = ["find", "insert", "update", "remove", "createIndex", "listIndexes", "listCollections",
                 "collStats", "dbStats"]
#: Published and embargoed databases: append-only for the owner too.
APPEND_ACTIONS = ["find", "insert", "createIndex", "listIndexes", "listCollections"]
READ_ACTIONS = ["find", "listIndexes", "listCollections"]


def redact(uri: str) -> str:
    """The URI with its password replaced by ``***`` (for messages and logs)."""
    return re.sub(r"(mongodb(?:\+srv)?://[^:/@]+:)[^@]*@", r"\1***@", str(uri))


class SecretURI(str):
    """A connection URI that holds a password: usable as a string, shown redacted.

    ``repr()`` (what a notebook prints for a cell's value), ``_repr_html_`` and f-strings with ``!r`` show
    ``***`` instead of the password; ``str(uri)`` is the real URI, for ``connect()`` or a spawner's
    environment.
    """

    def __repr__(self) -> str:
        return f"SecretURI({redact(str(self))!r})"

    def _repr_html_(self) -> str:
        import html

        return f"<code>{html.escape(repr(self))}</code>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


# -- naming ----------------------------------------------------------------------------------------------
def check_name(name: Any, what: str = "user") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise MLMDError(f"{what} name {name!r} is not allowed: use 2-31 lower-case letters, digits and '-', "
                        "starting with a letter (it becomes part of database names)")
    return name


def private_db(user: str) -> str:
    return f"mlmd_u_{user}"


def group_db(group: str, user: str) -> str:
    return f"mlmd_g_{group}_{user}"


def public_db(user: str) -> str:
    return f"mlmd_p_{user}"


def embargo_db(user: str) -> str:
    return f"mlmd_e_{user}"


def user_role(user: str) -> str:
    return f"mlmd_user_{user}"


@dataclass(frozen=True)
class Area:
    """One database a caller may read, and what living there means for its documents."""

    db: str
    owner: str
    visibility: str  # private | group | public
    group: str | None = None
    embargoed: bool = False
    mine: bool = False

    def stamp(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Set ``owner``, ``visibility`` and ``group`` of a read document from where it lives."""
        doc["owner"] = self.owner
        doc["visibility"] = self.visibility
        if self.group is not None:
            doc["group"] = self.group
        else:
            doc.pop("group", None)
        return doc


def parse_area(db: str, me: str | None) -> Area | None:
    """The :class:`Area` of a database name (None for names outside the layout)."""
    m = re.match(r"^mlmd_([upe])_([a-z][a-z0-9-]*)$", db)
    if m:
        kind, owner = m.groups()
        visibility = {"u": "private", "p": "public", "e": "public"}[kind]
        return Area(db, owner, visibility, None, kind == "e", owner == me)
    m = re.match(r"^mlmd_g_([a-z][a-z0-9-]*)_([a-z][a-z0-9-]*)$", db)
    if m:
        group, owner = m.groups()
        return Area(db, owner, "group", group, False, owner == me)
    return None


def visible_areas(client: MongoClient, me: str) -> list[Area]:
    """The databases ``me`` may read, own first (reads keep the first copy of a document id).

    The list comes from the directory (user and group names, written by the administrator); whether a
    database may really be read is the server's decision at each query — a database refused there is
    skipped by the caller.
    """
    directory = client[DIRECTORY_DB]
    users = [d["_id"] for d in directory.users.find({}, {"_id": 1})]
    me_doc = directory.users.find_one({"_id": me}) or {}
    groups = list(directory.groups.find({"members": me}, {"members": 1, "former": 1}))
    own = [parse_area(private_db(me), me)]
    own += [parse_area(db, me) for db in me_doc.get("areas", []) if db.startswith("mlmd_g_")]
    own += [parse_area(public_db(me), me), parse_area(embargo_db(me), me)]
    # members past and present: what a member shared stays readable by the group after they leave
    others = [parse_area(group_db(g["_id"], m), me) for g in groups
              for m in g.get("members", []) + g.get("former", []) if m != me]
    others += [parse_area(public_db(u), me) for u in users if u != me]
    seen: set[str] = set()
    out = []
    for area in own + others:
        if area is not None and area.db not in seen:
            seen.add(area.db)
            out.append(area)
    return out


def is_unauthorized(err: OperationFailure) -> bool:
    return err.code in (13, 18) or "not authorized" in str(err)


# -- embargo -----------------------------------------------------------------------------------------------
def embargo_date(value: str | date | datetime | None) -> datetime | None:
    """``embargo_until`` as an aware UTC datetime; None or a past date means no embargo."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise MLMDError(f"embargo_until {value!r} is not a date: write it like '2027-06-30'") from None
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day, tzinfo=UTC)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    now = datetime.now(UTC)
    if value - now > MAX_EMBARGO:
        raise MLMDError(f"embargo_until {value.date()} is more than 36 months away; publish with an embargo "
                        "of at most 36 months (as NOMAD), or keep the data private or group-shared until then")
    return value if value > now else None


def _past(value: Any) -> bool:
    if not isinstance(value, datetime):
        return True
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value <= datetime.now(UTC)


def check_licence(licence: str) -> str:
    if licence not in LICENCES:
        raise MLMDError(f"unknown licence {licence!r}: use one of {', '.join(LICENCES)}")
    return licence


# -- administration ----------------------------------------------------------------------------------------
def _privilege(db: str, actions: list[str]) -> dict[str, Any]:
    return {"resource": {"db": db, "collection": ""}, "actions": list(actions)}


class _AdminBase:
    def __init__(self, client: MongoClient, uri: str) -> None:
        self.client = client
        self.uri = uri
        self.admin = client.admin
        self.directory = client[DIRECTORY_DB]

    def _command(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return self.admin.command(*args, **kwargs)
        except OperationFailure as err:
            if is_unauthorized(err):
                raise DatabaseError(f"only an administrator can run {args[0]!r}: connect with the administrator's "
                                    "URI (mlmd_lab.db.server.start(...).uri on the embedded server)") from None
            raise DatabaseError(f"{args[0]} failed: {err.details.get('errmsg', err)}") from None

    def _require_admin(self) -> None:
        self._command("rolesInfo", PUBLIC_ROLE)  # raises the administrator message for anyone else

    def _ensure_public_role(self) -> None:
        if not self._command("rolesInfo", PUBLIC_ROLE)["roles"]:
            self._command("createRole", PUBLIC_ROLE, privileges=[_privilege(DIRECTORY_DB, READ_ACTIONS)], roles=[])

    def _user_doc(self, name: str) -> dict[str, Any]:
        doc = self.directory.users.find_one({"_id": name})
        if doc is None or doc.get("deleted"):
            raise MLMDError(f"no user {name!r}; existing users: {', '.join(self.list_names()) or 'none'}")
        return doc

    def list_names(self) -> list[str]:
        return sorted(d["_id"] for d in self.directory.users.find({"deleted": {"$ne": True}}, {"_id": 1}))

    def _grant(self, role: str, privileges: list[dict[str, Any]]) -> None:
        if privileges:
            self._command("grantPrivilegesToRole", role, privileges=privileges)

    def _revoke(self, role: str, privileges: list[dict[str, Any]]) -> None:
        if privileges:
            self._command("revokePrivilegesFromRole", role, privileges=privileges)


class Groups(_AdminBase):
    """Groups of users (``admin.groups``): members read each other's group-shared data."""

    def create(self, name: str) -> None:
        """Create an empty group (idempotent)."""
        check_name(name, "group")
        self._require_admin()
        self.directory.groups.update_one({"_id": name}, {"$setOnInsert": {"members": []}}, upsert=True)

    def list(self) -> dict[str, list[str]]:
        """{group: [members]}."""
        self._require_admin()
        return {g["_id"]: sorted(g.get("members", [])) for g in self.directory.groups.find().sort("_id", 1)}


class Users(_AdminBase):
    """Accounts on the server (``admin.users``); every method needs the administrator's connection."""

    def create(self, name: str, password: str, groups: Iterable[str] = ()) -> SecretURI:
        """Create user ``name`` with ``password``, a member of ``groups``.

        Returns the user's connection URI (a :class:`SecretURI`: shown redacted, never logged). Hand it to the
        user, or to JupyterHub's spawner as ``MLMD_MONGODB_URI``.
        """
        check_name(name)
        if not isinstance(password, str) or len(password) < MIN_PASSWORD:
            raise MLMDError(f"the password of {name!r} is too short: use at least {MIN_PASSWORD} characters "
                            "(e.g. secrets.token_urlsafe(16))")
        groups = [check_name(g, "group") for g in groups]
        self._ensure_public_role()
        if self._command("usersInfo", name)["users"]:
            raise MLMDError(f"user {name!r} exists already; delete it first or choose another name")
        if self.directory.users.find_one({"_id": name, "deleted": True}):
            raise MLMDError(f"the name {name!r} belonged to a deleted account whose data is still stored under it; "
                            "choose another name (a new account must not inherit someone else's data)")
        role = user_role(name)
        if self._command("rolesInfo", role)["roles"]:
            self._command("dropRole", role)
        own = [_privilege(private_db(name), OWNER_ACTIONS), _privilege(public_db(name), APPEND_ACTIONS),
               _privilege(embargo_db(name), APPEND_ACTIONS)]
        self._command("createRole", role, privileges=own, roles=[{"role": PUBLIC_ROLE, "db": "admin"}])
        self._grant(PUBLIC_ROLE, [_privilege(public_db(name), READ_ACTIONS)])
        self._command("createUser", name, pwd=password, roles=[{"role": role, "db": "admin"}])
        self.directory.users.update_one({"_id": name}, {"$set": {"areas": [], "deleted": False},
                                                        "$setOnInsert": {"created": datetime.now(UTC)}},
                                        upsert=True)
        for group in groups:
            self.add_to_group(name, group)
        return SecretURI(user_uri(self.uri, name, password))

    def list(self) -> dict[str, list[str]]:
        """{user: [groups]} of every existing user."""
        self._require_admin()
        groups = Groups(self.client, self.uri).list()
        return {u: [g for g, members in groups.items() if u in members] for u in self.list_names()}

    def add_to_group(self, name: str, group: str) -> None:
        """Make ``name`` a member of ``group`` (created if needed): effective on the member's next query."""
        check_name(group, "group")
        doc = self._user_doc(name)
        Groups(self.client, self.uri).create(group)
        found = self.directory.groups.find_one({"_id": group})
        members = [m for m in found["members"] + found.get("former", []) if m != name]
        mine = group_db(group, name)
        self._grant(user_role(name), [_privilege(mine, OWNER_ACTIONS)]
                    + [_privilege(group_db(group, m), READ_ACTIONS) for m in members])
        alive = set(self.list_names())
        for m in members:
            if m in alive:  # a deleted account has no role left to grant to
                self._grant(user_role(m), [_privilege(mine, READ_ACTIONS)])
        self.directory.groups.update_one({"_id": group}, {"$addToSet": {"members": name}, "$pull": {"former": name}})
        if mine not in doc.get("areas", []):
            self.directory.users.update_one({"_id": name}, {"$addToSet": {"areas": mine}})

    def remove_from_group(self, name: str, group: str) -> None:
        """End ``name``'s membership: from the next query on, ``name`` no longer reads the group's data.

        What ``name`` shared with the group stays shared (and stays ``name``'s to manage).
        """
        self._user_doc(name)
        found = self.directory.groups.find_one({"_id": group})
        if found is None or name not in found.get("members", []):
            raise MLMDError(f"{name!r} is not a member of group {group!r}")
        others = [m for m in found["members"] if m != name]
        former = [m for m in found.get("former", []) if m != name]
        self._revoke(user_role(name), [_privilege(group_db(group, m), READ_ACTIONS) for m in others + former])
        self.directory.groups.update_one({"_id": group}, {"$pull": {"members": name}, "$addToSet": {"former": name}})

    def delete(self, name: str) -> None:
        """Delete the account: open sessions lose every privilege at their next command.

        The user's data stays (published data remains public, group-shared data stays readable by the group,
        private data is readable by the administrator only); the name cannot be given to a new account.
        """
        self._user_doc(name)
        role = user_role(name)
        if self._command("rolesInfo", role)["roles"]:
            self._command("dropRole", role)
        if self._command("usersInfo", name)["users"]:
            self._command("dropUser", name)
        self.directory.groups.update_many({"members": name}, {"$pull": {"members": name},
                                                             "$addToSet": {"former": name}})
        self.directory.users.update_one({"_id": name}, {"$set": {"deleted": True}})


def user_uri(admin_uri: str, name: str, password: str) -> str:
    """``mongodb://name:password@host:port/?authSource=admin&...`` on the administrator's server."""
    parts = urlsplit(str(admin_uri))
    hosts = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(p for p in parts.query.split("&") if p and not p.startswith("authSource="))
    query = "authSource=admin" + ("&" + query if query else "")
    return f"{parts.scheme}://{quote_plus(name)}:{quote_plus(password)}@{hosts}/?{query}"


def new_password() -> str:
    """A random password of 24 URL-safe characters."""
    return secrets.token_urlsafe(18)


def login_name(client: MongoClient) -> str | None:
    """The user this connection authenticated as (None without authentication)."""
    try:
        users = client.admin.command("connectionStatus")["authInfo"].get("authenticatedUsers", [])
    except OperationFailure:
        return None
    return users[0]["user"] if users else None


def is_managed_user(client: MongoClient, name: str | None) -> bool:
    """True if ``name`` is an account made by :class:`Users` (it has a directory entry)."""
    if not name:
        return False
    try:
        doc = client[DIRECTORY_DB].users.find_one({"_id": name}, {"deleted": 1})
    except OperationFailure:
        return False
    return doc is not None and not doc.get("deleted")
