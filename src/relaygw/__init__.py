"""relaygw: an SMTP relay and forwarding gateway on Twisted."""

__version__ = "0.1.0"
