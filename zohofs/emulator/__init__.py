"""A stand-in for Zoho's backup hosts: a real HTTP server on a socket, for the demo and tests."""
