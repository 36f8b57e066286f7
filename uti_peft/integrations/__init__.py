"""Integrations with training libraries that a user imports explicitly (nothing here runs on ``import uti_peft``)."""
