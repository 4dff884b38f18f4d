"""Aeterna's common library: tenancy, errors, configuration, server bootstrap, telemetry and
store helpers shared by every service."""
