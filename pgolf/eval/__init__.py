"""Evaluation: window plans, sliding-window scoring, legal score-first TTT."""
