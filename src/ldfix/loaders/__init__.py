"""Loader back-ends: each turns a TargetView into an Analysis."""
