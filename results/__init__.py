"""Metrics, leaderboards, exports and plots."""
