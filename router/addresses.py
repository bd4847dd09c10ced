"""Lists of client addresses and networks (``WEBSOCKET_ALLOWED_HOSTS``, ``ROUTER_INGEST_TRUSTED_HOSTS``)."""

from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> list[Network]:
    """``"127.0.0.1, 10.0.0.0/8, ::1"`` -> networks; ValueError naming an entry that is neither."""
    networks = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network (like 10.0.0.0/8)") from None
    return networks


class AddressList:
    """Whether a client's address is one of the listed addresses or inside one of the networks.

    An IPv4 client seen through an IPv6 socket (``::ffff:10.1.2.3``) counts as its IPv4 address.
    Entries that are not addresses (a host name) match a client address written the same way.
    """

    def __init__(self, text: str) -> None:
        self.networks: list[Network] = []
        self.names: set[str] = set()
        for entry in (part.strip() for part in text.split(",")):
            if not entry:
                continue
            try:
                self.networks += parse_networks(entry)
            except ValueError:
                self.names.add(entry)

    def __bool__(self) -> bool:
        return bool(self.networks or self.names)

    def __contains__(self, remote: str | None) -> bool:
        if not remote:
            return False
        if remote in self.names:
            return True
        if not self.networks:  # (no address to parse for: most deployments list none)
            return False
        try:
            address = ipaddress.ip_address(remote.split("%", 1)[0])
        except ValueError:
            return False
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        return any(
            candidate in network
            for candidate in candidates
            for network in self.networks
            if candidate.version == network.version
        )
