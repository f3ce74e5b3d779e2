"""WireGuard core, check and lab tests."""
