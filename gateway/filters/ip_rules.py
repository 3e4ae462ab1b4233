"""
Client IP allow and deny lists per route (C{routes[].ip_rules}, default at
the top level): a refused client gets 403. See L{gateway.iprules.IpRules}
for the matching rules (deny wins; with an allow list, only its networks).

    ip_rules:
      allow: [10.0.0.0/8, "2001:db8::/32"]
      deny: [10.0.13.0/24]

C{ip_rules: false} on a route turns a top-level default off.

The address matched is the client's as the rate limiter sees it
(L{gateway.filters.rate_limit.forwarded_client}): the TCP peer's, unless the peer is in the
top-level C{trusted_proxies}; then C{X-Forwarded-For} is read from right to
left, past the trusted proxies, to the first address they did not add.
Without C{trusted_proxies}, behind a load balancer, it is the balancer's.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional

from twisted.logger import Logger

from gateway.config import Extension, ParseContext, Section, Where, register, sequence, string
from gateway.filters.rate_limit import forwarded_client
from gateway.iprules import IpRules
from gateway.pipeline import Answer, register_filter

NAME = "ip_rules"
ORDER = 20

_log = Logger()


def _networks(where: Where, value: Any) -> tuple[str, ...]:
    result = []
    for item_where, item in sequence(where, value):
        text = string(item_where, item)
        try:
            ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            raise item_where.error(f"not a CIDR network or address: {e}") from None
        result.append(text)
    return tuple(result)


def parse(where: Where, value: Any, context: ParseContext) -> Optional[IpRules]:
    """
    C{{allow: [...], deny: [...]}}, or C{false} for no rules.

    @raise ConfigError: a malformed network (host bits set included).
    """
    if value is False:
        return None
    section = Section(where, value)
    rules = IpRules(
        allow=section.take("allow", _networks, ()),
        deny=section.take("deny", _networks, ()),
    )
    section.finish()
    return None if rules.empty else rules


register("route", Extension(NAME, parse, default=None, top_default=True))


class IpRulesFilter:
    """Refuses clients outside the route's IP rules with 403."""

    name = NAME

    def __init__(self, gateway) -> None:
        pass

    def on_request(self, request, context) -> Optional[Answer]:
        rules = context.route.options.get(NAME)
        if rules is None:
            return None
        client = forwarded_client(request, context)
        if rules.allows(client):
            return None
        context.error = "client address refused"
        _log.info(
            "client {client} (peer {peer}) refused by the IP rules of route {route}",
            client=client,
            peer=context.client_ip,
            route=context.route.name,
            request_id=context.request_id,
        )
        return Answer.error_(403, "forbidden")


register_filter(ORDER, NAME, IpRulesFilter)
