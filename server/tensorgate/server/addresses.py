"""HOST:PORT addresses, as the settings spell them (IPv6 hosts in brackets: [::1]:8001)."""

from __future__ import annotations

__all__ = ["split_address"]


def split_address(address: str, what: str = "address") -> tuple[str, int]:
    """The host (brackets kept) and port of HOST:PORT; ValueError naming `what` when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{what} {address!r} is not HOST:PORT")
    return host, int(port)
