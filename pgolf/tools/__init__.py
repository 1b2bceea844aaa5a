"""User tools: the pgolf CLI, inspect, significance, params profiles, plots."""
