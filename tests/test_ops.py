"""Unit tests for the operations modules: reload, drain, TLS config, workers, sd_notify."""

from gateway.config import parse_config


def test_partial_sections_keep_their_defaults():
    # Defaults of attrs slotted classes must come from attrs.fields(), not
    # the class attribute (a member descriptor).
    config = parse_config(
        """
admin: {}
limits: {}
services:
  a: {backends: [{url: "http://127.0.0.1:1"}], timeouts: {response: 60s}}
routes: []
"""
    )
    assert config.services["a"].timeouts.connect == 2.0
    assert config.admin.listen == "tcp:9901:interface=127.0.0.1"
    assert config.limits.max_request_body == 10 * 1024 * 1024
