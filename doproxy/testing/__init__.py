"""Test doubles that ship with doproxy, so its own tests and yours can run without the internet.

`doproxy.testing.fake_digitalocean.FakeDigitalOcean` is a stateful fake of the part of
DigitalOcean's API v2 that doproxy uses, checked against DigitalOcean's OpenAPI spec.
"""

from __future__ import annotations
