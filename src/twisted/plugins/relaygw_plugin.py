"""Twisted plugin: makes `twistd relaygw` find relaygw.tap (no __init__.py here, by design)."""

from twisted.application.service import ServiceMaker

relaygw = ServiceMaker("relaygw", "relaygw.tap", "SMTP relay and forwarding gateway", "relaygw")
