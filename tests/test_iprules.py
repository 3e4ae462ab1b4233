"""
Tests for L{gateway.iprules}.
"""

import ipaddress

import pytest

from gateway.iprules import IpRules, parse_client_address


def test_no_rules_allow_everyone():
    rules = IpRules()
    assert rules.empty
    assert rules.allows("192.0.2.1") and rules.allows("2001:db8::1")
    assert rules.allows("not-an-ip")


def test_allow_list_only():
    rules = IpRules(allow=["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"])
    assert rules.allows("10.1.2.3")
    assert rules.allows("10.255.255.255")
    assert not rules.allows("11.0.0.0")
    assert not rules.allows("9.255.255.255")
    assert rules.allows("192.0.2.7")
    assert not rules.allows("192.0.2.8")
    assert rules.allows("2001:db8:ffff::1")
    assert not rules.allows("2001:db9::1")


def test_deny_list_only():
    rules = IpRules(deny=["203.0.113.0/24", "2001:db8:bad::/48"])
    assert not rules.allows("203.0.113.200")
    assert rules.allows("203.0.114.1")
    assert not rules.allows("2001:db8:bad:1::1")
    assert rules.allows("2001:db8:bae::1")


def test_deny_wins_over_allow():
    rules = IpRules(allow=["10.0.0.0/8"], deny=["10.6.6.0/24"])
    assert rules.allows("10.6.7.1")
    assert not rules.allows("10.6.6.6")
    rules = IpRules(allow=["10.6.6.6"], deny=["10.0.0.0/8"])
    assert not rules.allows("10.6.6.6")


def test_versions_do_not_cross():
    # ::a00:1 is 10.0.0.1's integer value as IPv6: it must not match 10/8.
    rules = IpRules(allow=["10.0.0.0/8"])
    assert not rules.allows("::a00:1")
    rules = IpRules(allow=["::/96"])
    assert not rules.allows("10.0.0.1")


def test_ipv4_mapped_ipv6_client_matches_ipv4_rules():
    rules = IpRules(allow=["192.0.2.0/24"], deny=["192.0.2.66"])
    assert rules.allows("::ffff:192.0.2.1")
    assert not rules.allows("::ffff:192.0.2.66")
    assert not rules.allows("::ffff:198.51.100.1")


def test_address_forms():
    rules = IpRules(allow=["fe80::/10", "::1"])
    assert rules.allows("fe80::1%eth0")
    assert rules.allows("[::1]")
    assert rules.allows("0:0:0:0:0:0:0:1")


def test_catch_all_networks():
    rules = IpRules(allow=["0.0.0.0/0"], deny=["::/0"])
    assert rules.allows("198.51.100.1")
    assert not rules.allows("2001:db8::1")


def test_unparsable_client_fails_closed():
    assert not IpRules(deny=["192.0.2.0/24"]).allows("unix:/run/gw.sock")
    assert not IpRules(allow=["0.0.0.0/0"]).allows("")


def test_configuration_errors():
    for bad in [["10.0.0.1/8"], ["300.0.0.0/8"], ["10.0.0.0/33"], ["example.com"], ["2001:db8::1/129"]]:
        with pytest.raises(ValueError):
            IpRules(allow=bad)
        with pytest.raises(ValueError):
            IpRules(deny=bad)


def test_parse_client_address():
    assert parse_client_address("::ffff:10.0.0.1") == ipaddress.ip_address("10.0.0.1")
    assert parse_client_address("2001:db8::1") == ipaddress.ip_address("2001:db8::1")
    assert parse_client_address("nope") is None


def test_many_networks_against_ipaddress():
    """Agreement with the standard library on a spread of addresses."""
    allow = ["10.%d.0.0/16" % i for i in range(0, 256, 3)] + ["2001:db8:%x::/48" % i for i in range(0, 64, 5)]
    deny = ["10.3.%d.0/24" % i for i in range(0, 256, 7)]
    rules = IpRules(allow=allow, deny=deny)
    allow_nets = [ipaddress.ip_network(n) for n in allow]
    deny_nets = [ipaddress.ip_network(n) for n in deny]
    candidates = ["10.%d.%d.9" % (a, b) for a in range(0, 12) for b in range(0, 256, 5)]
    candidates += ["2001:db8:%x::9" % i for i in range(0, 70)]
    for c in candidates:
        address = ipaddress.ip_address(c)
        expected = not any(address in n for n in deny_nets) and any(address in n for n in allow_nets)
        assert rules.allows(c) is expected, c
