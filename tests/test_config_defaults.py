"""Defaults of config keys left out of a section."""

from gateway.config import Admin, Limits, Timeouts, parse_config


def test_absent_keys_take_their_defaults():
    config = parse_config(
        """
admin: {}
limits: {}
services:
  s:
    backends: [{url: "http://127.0.0.1:9001"}]
    timeouts: {response: 1s}
routes:
  - {name: r, service: s}
"""
    )
    assert config.services["s"].timeouts == Timeouts(connect=2.0, response=1.0)
    assert config.admin == Admin()
    assert config.limits == Limits()
