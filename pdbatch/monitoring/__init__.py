"""Monitoring: worker metrics, the scheduler-side monitor, the dashboard page, Prometheus, driver
progress and the terminal, and the job report."""
