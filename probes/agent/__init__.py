"""The probe agent: plan, scheduler, metrics, HTTP endpoints, reporter with a disk spool."""
