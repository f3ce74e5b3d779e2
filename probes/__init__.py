"""tunnelwatch: health checks and SLOs for load-balanced VPN fleets."""

__version__ = "0.1.0"
