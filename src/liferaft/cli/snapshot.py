"""``liferaft snapshot save|status|restore`` and ``liferaft recover``: backups and
disaster recovery (docs/operations.md, "Backup and restore", "Losing quorum").

``save`` is a client command (admin token); ``status`` reads a file; ``restore`` and
``recover`` work on a stopped node's data dir, named by its config file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from liferaft.backupfile import BackupError, read_info
from liferaft.cli.client_cmds import (
    EXIT_FAILED,
    EXIT_USAGE,
    client_options,
    failure,
    human_bytes,
    print_json,
    run_client,
    settings,
)
from liferaft.config import ConfigError, Settings, load
from liferaft.node.restore import RestoreError, recover, restore, tls_probe
from liferaft.storage.errors import StorageError


@click.group()
def snapshot() -> None:
    """Back up the store to a file, check a backup, restore one into a new cluster."""


@snapshot.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@client_options
def save(file: Path, **common: Any) -> None:
    """Save a consistent backup from a live node (the first endpoint that answers) into
    FILE: streamed, checksummed, written atomically. Needs the admin role."""
    s = settings(**common)
    bar = _Progress() if sys.stderr.isatty() and not s.json else None
    meta = run_client(s, lambda c: c.snapshot_save(file, progress=bar))
    if bar is not None:
        bar.done()
    info = read_info(file)
    if s.json:
        print_json(_describe(info))
    else:
        click.echo(
            f"Saved {file}: revision {meta['revision']}, {meta['keys']} keys, "
            f"{human_bytes(info.file_bytes)} (from {meta.get('node_id')})."
        )


@snapshot.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
def status(file: Path, output: str) -> None:
    """Check FILE (size, checksum) and say what it holds. Exit 1 if it is damaged."""
    try:
        info = read_info(file)
    except BackupError as exc:
        if output == "json":
            print_json({"ok": False, "error": str(exc)})
            sys.exit(EXIT_FAILED)
        raise failure(str(exc), EXIT_FAILED) from None
    doc = _describe(info)
    if output == "json":
        print_json(doc)
        return
    members = ", ".join(m.get("id", "?") for m in info.meta.get("members", []))
    click.echo(f"revision   {info.revision}")
    click.echo(f"keys       {info.keys}")
    click.echo(f"size       {human_bytes(info.file_bytes)}")
    click.echo(f"applied    {info.applied}")
    click.echo(f"from       {info.meta.get('node_id', '-')} ({members or '-'})")
    click.echo(f"created    {info.meta.get('created', '-')}")
    click.echo("checksum   ok")


def _describe(info: Any) -> dict[str, Any]:
    return {
        "ok": True,
        "revision": info.revision,
        "keys": info.keys,
        "bytes": info.file_bytes,
        "applied": info.applied,
        "digest": info.digest,
        "node_id": info.meta.get("node_id"),
        "created": info.meta.get("created"),
        "members": info.meta.get("members", []),
    }


@snapshot.command(name="restore")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
def restore_cmd(file: Path, config_path: Path) -> None:
    """Fill the empty data_dir of the node in CONFIG from backup FILE, as a member of a
    NEW cluster made of CONFIG's [cluster] members. Run it once per member (same file),
    then start the nodes."""
    s = _settings(config_path)
    try:
        done = restore(file, s)
    except (BackupError, RestoreError, StorageError) as exc:
        raise failure(str(exc), EXIT_FAILED) from None
    click.echo(
        f"Restored {s.node.id} into {done.data_dir}: revision {done.revision}, log index "
        f"{done.applied}, new cluster {done.cluster_id} of {', '.join(done.members)}."
    )


@click.command(name="recover")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
def recover_cmd(config_path: Path) -> None:
    """Bring a cluster that lost its quorum back from this stopped node's data: it becomes
    the one member of a new cluster (the old data dir is kept beside it). Refuses while
    the node runs or while its peers still make a quorum. Then add members back."""
    s = _settings(config_path)
    try:
        done = recover(s, probe=tls_probe(s))
    except (RestoreError, StorageError) as exc:
        raise failure(str(exc), EXIT_FAILED) from None
    click.echo(
        f"Recovered {s.node.id}: revision {done.revision}, log index {done.applied}, new "
        f"cluster {done.cluster_id} with {s.node.id} as its only member. The old data dir "
        f"is {done.moved_to}. Start the node, then add members back "
        "(docs/operations.md, 'Losing quorum')."
    )


def _settings(config_path: Path) -> Settings:
    try:
        return load(config_path)
    except ConfigError as exc:
        raise failure(f"config error: {exc}", EXIT_USAGE) from None


class _Progress:
    """A one-line progress bar on stderr (a terminal only)."""

    def __init__(self) -> None:
        self._shown = -1

    def __call__(self, received: int, total: int) -> None:
        pct = 100 * received // total if total else 100
        if pct != self._shown:
            self._shown = pct
            filled = pct // 4
            bar = "#" * filled + "." * (25 - filled)
            click.echo(f"\r[{bar}] {pct:3d}% {human_bytes(received)}", err=True, nl=False)

    def done(self) -> None:
        click.echo("", err=True)
