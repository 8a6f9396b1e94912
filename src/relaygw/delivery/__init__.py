"""Transports: each delivers one attempt for a group of recipients (see interfaces.IDeliverer)."""
