"""Which handle offloads which model, and which handles take turns on a device (a group).

A model (or pipeline) carries its handle as an attribute, so `handle_of` needs no table that
would keep models alive; a group is a weak set of handles, so a handle that is gone leaves it."""

from __future__ import annotations

import weakref

_HANDLE_ATTR = "_fastvideo_offload_handle"
#: Models enabled with the same `group` take turns on the device (Wan2.2's two experts).
_GROUPS: dict[str, weakref.WeakSet] = {}


def handle_of(obj):
    """The handle of an offloaded model or pipeline, or None."""
    return getattr(obj, _HANDLE_ATTR, None)


def attach(obj, handle) -> None:
    setattr(obj, _HANDLE_ATTR, handle)


def detach(obj, handle) -> None:
    """Forgets `handle` on `obj`, unless another handle has been attached since."""
    if obj is not None and getattr(obj, _HANDLE_ATTR, None) is handle:
        delattr(obj, _HANDLE_ATTR)


def join_group(group: str, handle) -> None:
    _GROUPS.setdefault(group, weakref.WeakSet()).add(handle)


def group_handles(group: str) -> list:
    """The enabled handles of a group."""
    return [h for h in list(_GROUPS.get(group, ())) if h.enabled]
