"""Resolve an image `User` string (uid, uid:gid, name, name:group) against the container's own files.

/etc/passwd and /etc/group are opened relative to the rootfs without following symlinks, so an image
cannot make the agent read a file outside its rootfs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sandbox.shared.errors import GuestOperationFailed


@dataclass(frozen=True)
class ResolvedUser:
    uid: int
    gid: int
    user_name: str            # "" when the uid has no passwd entry
    group_name: str           # "" when the gid has no group entry
    additional_gids: tuple[tuple[int, str], ...] = ()


class UserError(GuestOperationFailed):
    pass


MAX_ID = (1 << 32) - 2      # (uid_t)-1 means "no change" to the kernel: never an id


def _id(text: str, what: str) -> int | None:
    """A numeric uid or gid (ASCII digits only: str.isdigit() also takes '²' and other scripts' digits),
    None for a name."""
    if not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    if value > MAX_ID:
        raise UserError(f"{what} {text[:20]!r} is beyond the largest id {MAX_ID}")
    return value


def _read_etc(rootfs: str, name: str) -> list[list[str]]:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        root = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        etc = os.open("etc", flags | os.O_DIRECTORY, dir_fd=root)
        try:
            fd = os.open(name, flags, dir_fd=etc)
        finally:
            os.close(etc)
    except OSError:
        return []
    finally:
        os.close(root)
    with os.fdopen(fd, "rb") as f:
        data = f.read(1 << 20)
    rows = []
    for line in data.decode("utf-8", "replace").splitlines():
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def _image_id(text: str, what: str) -> int:
    value = _id(text, what)
    if value is None:
        raise UserError(f"{what} in the image is not a number: {text[:20]!r}")
    return value


def resolve_user(rootfs: str, user: str) -> ResolvedUser:
    passwd = [r for r in _read_etc(rootfs, "passwd") if len(r) >= 4]
    groups = [r for r in _read_etc(rootfs, "group") if len(r) >= 3]
    user = user.strip()
    user_part, _, group_part = user.partition(":")
    user_part = user_part or "0"

    uid_given = _id(user_part, "uid")
    if uid_given is not None:
        uid = uid_given
        entry = next((r for r in passwd if r[2] == user_part), None)
    else:
        entry = next((r for r in passwd if r[0] == user_part), None)
        if entry is None:
            raise UserError(f"user {user_part!r} is not in the image's /etc/passwd")
        uid = _image_id(entry[2], f"the uid of {user_part!r}")
    user_name = entry[0] if entry else ""

    if group_part:
        gid_given = _id(group_part, "gid")
        if gid_given is not None:
            gid = gid_given
        else:
            g = next((r for r in groups if r[0] == group_part), None)
            if g is None:
                raise UserError(f"group {group_part!r} is not in the image's /etc/group")
            gid = _image_id(g[2], f"the gid of {group_part!r}")
    else:
        gid = (_id(entry[3], "gid") or 0) if entry else 0
    group_name = next((r[0] for r in groups if r[2] == str(gid)), "")

    extra: list[tuple[int, str]] = []
    if user_name and not group_part:
        for g in groups:
            members = g[3].split(",") if len(g) > 3 and g[3] else []
            extra_gid = _id(g[2], "gid") if user_name in members else None
            if extra_gid is not None and extra_gid != gid:
                extra.append((extra_gid, g[0]))
    return ResolvedUser(uid, gid, user_name, group_name, tuple(extra))
