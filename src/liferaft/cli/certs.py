"""``liferaft certs`` and ``liferaft token`` (docs/security.md): the files a cluster needs
to start, and tokens for its clients."""

from __future__ import annotations

import re
import time
from pathlib import Path

import click

from liferaft.security.certs import drop_old_jwt_keys as drop_old_keys
from liferaft.security.certs import generate
from liferaft.security.certs import new_jwt_key as rotate_jwt_key
from liferaft.security.certs import renew as renew_nodes
from liferaft.security.tokens import mint, parse_roles


class ConfigError(click.ClickException):
    """Bad input that is not a command-line typo (an inconsistent directory, a wrong key
    file): exit 2 like a usage error (README.md, "Using it"), without the usage text."""

    exit_code = 2


def _split(value: str) -> list[str]:
    # Commas or spaces, so that both --nodes n1,n2 and the Makefile's NODES="n1 n2" work.
    return [part for part in re.split(r"[,\s]+", value) if part]


@click.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default="certs",
    show_default=True,
    help="Directory to write into (created if missing).",
)
@click.option("--nodes", default=None, help="Node ids, comma-separated: n1,n2,n3.")
@click.option(
    "--san",
    "sans",
    multiple=True,
    help="Extra subjectAltName for every node certificate: an IP or a DNS name. Repeatable.",
)
@click.option("--force", is_flag=True, help="Replace existing files (a new CA and new keys).")
@click.option(
    "--renew",
    is_flag=True,
    help="Give the --nodes a new key and certificate under the existing CA; nothing else "
    "changes. Their extra SANs are kept unless --san is given.",
)
@click.option(
    "--new-jwt-key",
    is_flag=True,
    help="Replace jwt-private.pem with a new key and add its public half in front of "
    "jwt-public.pem, which keeps the old keys (tokens signed by them still verify).",
)
@click.option(
    "--drop-old-jwt-keys",
    is_flag=True,
    help="Keep in jwt-public.pem only the public half of jwt-private.pem.",
)
def certs(
    directory: Path,
    nodes: str | None,
    sans: tuple[str, ...],
    force: bool,
    renew: bool,
    new_jwt_key: bool,
    drop_old_jwt_keys: bool,
) -> None:
    """Write the cluster CA, a certificate and key per node, and the JWT key pair.

    Existing files are kept: run it again with more node ids to add only their
    certificates, signed by the existing CA. Private keys are written with mode 0600.
    --renew, --new-jwt-key and --drop-old-jwt-keys rotate what a running cluster uses;
    nodes pick the new files up on SIGHUP (docs/security.md, "Rotating certificates and
    keys").
    """
    ctx = click.get_current_context()
    rotating_jwt = new_jwt_key or drop_old_jwt_keys
    if new_jwt_key and drop_old_jwt_keys:
        raise click.UsageError("--new-jwt-key and --drop-old-jwt-keys exclude each other", ctx)
    if force and (renew or rotating_jwt):
        raise click.UsageError("--force makes everything anew; it does not go with renewing", ctx)
    ids = _split(nodes or "")
    if not ids and (renew or not rotating_jwt):
        raise click.UsageError("--nodes needs at least one node id", ctx)
    if ids and rotating_jwt and not renew:
        raise click.UsageError("--nodes goes with --renew when rotating the JWT key", ctx)
    try:
        if renew or rotating_jwt:
            written = renew_nodes(directory, ids, sans=sans or None) if renew else []
            if new_jwt_key:
                written += rotate_jwt_key(directory)
            if drop_old_jwt_keys:
                written += drop_old_keys(directory)
        else:
            written = generate(directory, ids, sans=sans, force=force)
    except ValueError as exc:  # includes CertsError
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write to {directory}: {exc}") from None
    for path in written:
        click.echo(f"wrote {path}")
    if not written and drop_old_jwt_keys:
        click.echo(f"{directory / 'jwt-public.pem'} holds only the current key; nothing written")
    elif not written:
        click.echo(f"all files already exist in {directory}; nothing written (--force replaces)")


@click.command()
@click.option(
    "--key",
    "key_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Private key to sign with (certs/jwt-private.pem).",
)
@click.option("--sub", required=True, help="Who the token is for.")
@click.option("--roles", required=True, help="Comma-separated: read, write, admin.")
@click.option(
    "--ttl",
    type=click.IntRange(min=1),
    default=3600,
    show_default=True,
    help="Seconds until it expires.",
)
@click.option(
    "--prefix",
    "prefixes",
    multiple=True,
    help="Key prefix the token may touch. Repeatable; none means every key.",
)
@click.option("--issuer", default="liferaft", show_default=True, help="The iss claim.")
@click.option("--audience", default="liferaft", show_default=True, help="The aud claim.")
@click.option("--kid", default=None, help="Key id header, when nodes hold several keys.")
def token(
    key_path: Path,
    sub: str,
    roles: str,
    ttl: int,
    prefixes: tuple[str, ...],
    issuer: str,
    audience: str,
    kid: str | None,
) -> None:
    """Print a signed JWT for a client."""
    try:
        pem = key_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {key_path}: {exc.strerror}") from None
    role_names = _split(roles)
    try:
        parse_roles(role_names)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--roles") from None
    if not sub:
        raise click.BadParameter("must not be empty", param_hint="--sub")
    if kid == "":
        raise click.BadParameter("must not be empty", param_hint="--kid")
    try:
        jwt = mint(
            pem,
            sub=sub,
            roles=role_names,
            ttl_s=ttl,
            prefixes=list(prefixes) if prefixes else None,
            issuer=issuer,
            audience=audience,
            kid=kid,
            now=time.time(),
        )
    except ValueError as exc:  # what is left is the key file's fault
        raise ConfigError(f"{key_path}: {exc}") from None
    click.echo(jwt)
