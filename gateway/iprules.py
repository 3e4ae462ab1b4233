"""
Client IP allow and deny lists.

A client is refused (403 at the HTTP layer) when its address is in a deny
network, or when there is an allow list and its address is in none of the
allow networks: deny wins. IPv4 and IPv6 networks may be mixed; an
IPv4-mapped IPv6 address (C{::ffff:192.0.2.1}, as a dual-stack listener
reports IPv4 clients) is matched as the IPv4 address it carries.

Matching is a handful of integer operations per configured network, after one
parse of the client address.
"""

from __future__ import annotations

import ipaddress
from typing import Optional, Sequence, Union

import attrs

_Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
_Pairs = tuple[tuple[int, int], ...]


def _compile(values: Sequence[str]) -> tuple[_Pairs, _Pairs]:
    v4, v6 = [], []
    for value in values:
        network = ipaddress.ip_network(value, strict=True)
        pair = (int(network.network_address), int(network.netmask))
        (v4 if network.version == 4 else v6).append(pair)
    return tuple(v4), tuple(v6)


def parse_client_address(host: str) -> Optional[_Address]:
    """
    Parse a client address as the transport reports it.

    @param host: C{"192.0.2.1"}, C{"2001:db8::1"}, C{"[2001:db8::1]"},
        C{"fe80::1%eth0"} (the zone does not take part in matching) or C{"::ffff:192.0.2.1"}
        (returned as the IPv4 address).
    @return: the address, or L{None} when C{host} is not an IP address
        (a UNIX socket, for example).
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@attrs.frozen
class IpRules:
    """
    Allow and deny lists of networks.

    @ivar allow: CIDR networks (C{"10.0.0.0/8"}, C{"2001:db8::/32"}) or
        single addresses; when not empty, only these clients are allowed.
    @ivar deny: CIDR networks or addresses always refused.
    @raise ValueError: at construction, on a malformed network or one with
        host bits set (C{"10.0.0.1/8"}: a typo for C{10.0.0.0/8} or for
        C{10.0.0.1/32}, which the gateway will not guess).
    """

    allow: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    deny: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    _allow4: tuple = attrs.field(init=False, eq=False, repr=False)
    _allow6: tuple = attrs.field(init=False, eq=False, repr=False)
    _deny4: tuple = attrs.field(init=False, eq=False, repr=False)
    _deny6: tuple = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        allow4, allow6 = _compile(self.allow)
        deny4, deny6 = _compile(self.deny)
        object.__setattr__(self, "_allow4", allow4)
        object.__setattr__(self, "_allow6", allow6)
        object.__setattr__(self, "_deny4", deny4)
        object.__setattr__(self, "_deny6", deny6)

    @property
    def empty(self) -> bool:
        """Whether there is no rule at all (every client is allowed)."""
        return not self.allow and not self.deny

    def allows(self, client_ip: str) -> bool:
        """
        Whether a client may call.

        @param client_ip: the client address, as
            C{request.getClientAddress().host} gives it.
        @return: L{True} when allowed. An address that is not an IP address
            is refused whenever there is any rule (fail closed), and allowed
            when there is none.
        """
        if self.empty:
            return True
        address = parse_client_address(client_ip)
        if address is None:
            return False
        value = int(address)
        if address.version == 4:
            deny, allow = self._deny4, self._allow4
        else:
            deny, allow = self._deny6, self._allow6
        for network, mask in deny:
            if value & mask == network:
                return False
        if not self.allow:
            return True
        for network, mask in allow:
            if value & mask == network:
                return True
        return False
