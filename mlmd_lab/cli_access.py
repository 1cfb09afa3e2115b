"""``mlmd-lab users``, ``share``, ``publish``, ``datasets`` and ``server start --auth``: the command-line face of
:mod:`mlmd_lab.db.access` (the same functions as the notebook API).

Passwords are never taken from the command line (other users of the machine see it in ``ps``): they come from
a prompt, a file or are generated; a new user's URI goes to a file readable by its owner only.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from mlmd_lab.errors import MLMDError


def add_parsers(sub) -> None:
    us = sub.add_parser("users", help="accounts of a shared database (administrator): add, list, group, delete, "
                                      "release-embargoes, retract")
    actions = us.add_subparsers(title="actions", dest="action", required=True)
    add = actions.add_parser("add", help="create a user; the password from a prompt, --password-file or --generate")
    add.add_argument("name")
    add.add_argument("--group", action="append", default=[], help="a group to join (repeatable)")
    add.add_argument("--password-file", help="file whose first line is the password")
    add.add_argument("--generate", action="store_true", help="generate a random password (needs --uri-file)")
    add.add_argument("--uri-file", help="write the user's connection URI here (mode 0600), e.g. for the spawner")
    actions.add_parser("list", help="users and their groups (JSON)")
    grp = actions.add_parser("group", help="add a user to a group or remove them from it")
    grp.add_argument("name")
    which = grp.add_mutually_exclusive_group(required=True)
    which.add_argument("--add", metavar="GROUP")
    which.add_argument("--remove", metavar="GROUP")
    dele = actions.add_parser("delete", help="delete a user (open sessions lose access at once; data is kept)")
    dele.add_argument("name")
    dele.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    actions.add_parser("release-embargoes", help="publish every embargoed data set whose date has passed (cron)")
    ret = actions.add_parser("retract", help="take a published data set back to its owner (recorded)")
    ret.add_argument("owner")
    ret.add_argument("dataset")
    ret.add_argument("--reason", required=True)
    us.set_defaults(func=cmd_users)

    sh = sub.add_parser("share", help="let a group read one of your data sets")
    sh.add_argument("dataset")
    sh.add_argument("--group", help="the group (default: your only group)")
    sh.set_defaults(func=cmd_share)
    pub = sub.add_parser("publish", help="publish one of your data sets (everyone reads it; nobody edits it)")
    pub.add_argument("dataset")
    pub.add_argument("--embargo-until", metavar="YYYY-MM-DD", help="hidden from others until this date (<= 36 months)")
    pub.set_defaults(func=cmd_publish)
    sub.add_parser("datasets", help="the data sets you may see: owner, visibility, licence, frames").set_defaults(
        func=cmd_datasets)


def add_ingest_options(ing) -> None:
    ing.add_argument("--visibility", choices=("private", "group", "public"), default="private",
                     help="who may read the data (default private)")
    ing.add_argument("--dataset", help="data set name (default: the file or folder name)")
    ing.add_argument("--licence", default="CC-BY-4.0", help="licence for others' use (default CC-BY-4.0)")
    ing.add_argument("--group", help="group for --visibility group (default: your only group)")
    ing.add_argument("--embargo-until", metavar="YYYY-MM-DD", help="with --visibility public: hidden until then")


def add_server_options(srv) -> None:
    srv.add_argument("--auth", action="store_true", help="start with accounts (authentication on)")
    srv.add_argument("--port", type=int, help="TCP port (default: a free one)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (not 127.0.0.1: needs TLS)")
    srv.add_argument("--tls-cert", help="PEM certificate")
    srv.add_argument("--tls-key", help="PEM private key")
    srv.add_argument("--tls-ca", help="PEM CA file")


def admin_connection(args: argparse.Namespace):
    """The administrator's connection: ``--uri``/``$MLMD_MONGODB_URI``, else the accounts server of ``--data-dir``
    (its ``admin.secret``)."""
    from mlmd_lab.db import connect
    from mlmd_lab.db.server import EmbeddedServer

    if args.uri or os.environ.get("MLMD_MONGODB_URI"):
        return connect(args.uri)
    server = EmbeddedServer(args.data_dir, auth=True)
    info = server.status()
    if info is None or not info.auth:
        raise MLMDError(f"no database with accounts runs for {server.data_dir}: start it with "
                        "'mlmd-lab server start --auth', or give the administrator's URI in MLMD_MONGODB_URI")
    return connect(server.admin_uri(info))


def _password(args: argparse.Namespace) -> str:
    from mlmd_lab.db.access import new_password

    if args.generate:
        if not args.uri_file:
            raise MLMDError("--generate needs --uri-file: the generated password is written only there")
        return new_password()
    if args.password_file:
        try:
            return Path(args.password_file).read_text().splitlines()[0].strip()
        except (OSError, IndexError):
            raise MLMDError(f"cannot read a password from {args.password_file}: give a file whose first line is "
                            "the password") from None
    if not sys.stdin.isatty():
        raise MLMDError("no terminal to ask for the password: use --password-file FILE or --generate --uri-file FILE")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise MLMDError("the two passwords differ; nothing was created")
    return first


def _write_private(path: str, text: str) -> None:
    target = Path(path)
    target.unlink(missing_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")


def cmd_users(args: argparse.Namespace) -> int:
    admin = admin_connection(args)
    if args.action == "add":
        uri = admin.users.create(args.name, _password(args), groups=args.group)
        if args.uri_file:
            _write_private(args.uri_file, str(uri))
            print(f"user {args.name} created; connection URI written to {args.uri_file} (mode 0600)")
        else:
            print(f"user {args.name} created; connection URI {uri!r} (the password is the one you typed)")
    elif args.action == "list":
        print(json.dumps(admin.users.list(), indent=2))
    elif args.action == "group":
        if args.add:
            admin.users.add_to_group(args.name, args.add)
            print(f"{args.name} joined {args.add}")
        else:
            admin.users.remove_from_group(args.name, args.remove)
            print(f"{args.name} left {args.remove}")
    elif args.action == "delete":
        if not args.yes and (not sys.stdin.isatty() or input(f"delete user {args.name}? [y/N] ").lower() != "y"):
            print("not deleted (confirm, or pass --yes)")
            return 1
        admin.users.delete(args.name)
        print(f"user {args.name} deleted (their data is kept)")
    elif args.action == "release-embargoes":
        print(f"{admin.release_all_embargoes()} frames released")
    elif args.action == "retract":
        print(f"{admin.retract(args.owner, args.dataset, args.reason)} frames retracted")
    return 0


def connect_from_args(args: argparse.Namespace):
    """The database of ``--uri``/``--database``/``--data-dir`` (every mlmd-lab command connects this way)."""
    from mlmd_lab.db import connect

    return connect(args.uri, args.database, data_dir=args.data_dir)


def cmd_share(args: argparse.Namespace) -> int:
    print(f"{connect_from_args(args).share(args.dataset, args.group)} frames of {args.dataset!r} shared")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    n = connect_from_args(args).publish(args.dataset, embargo_until=args.embargo_until)
    when = f" (embargoed until {args.embargo_until})" if args.embargo_until else ""
    print(f"{n} frames of {args.dataset!r} published{when}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    rows = connect_from_args(args).datasets()
    print(f"{'owner':<12} {'data set':<28} {'visibility':<12} {'licence':<16} {'frames':>7}  embargo")
    for r in rows:
        vis = r["visibility"] + (f"({r['group']})" if r.get("group") else "")
        until = r.get("embargo_until")
        print(f"{r['owner']:<12} {str(r['dataset']):<28} {vis:<12} {str(r.get('licence')):<16} {r['frames']:>7}  "
              f"{until.date() if until else '-'}")
    return 0


def start_server(args: argparse.Namespace) -> int:
    from mlmd_lab.db.server import start

    handle = start(args.data_dir or _default_dir(), port=args.port, auth=True, host=args.host,
                   tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca)
    print(f"database with accounts running on port {handle.port} (data in {handle.server.data_dir}); the "
          f"administrator's password is in {handle.server.secret_file}; add users with 'mlmd-lab users add NAME'")
    return 0


def _default_dir() -> Path:
    from mlmd_lab.db.server import default_data_dir

    return default_data_dir()
