"""Reporting: tables (one mean and spread rule) and pictures of a run's results."""
