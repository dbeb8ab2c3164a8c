"""Tests of vdiff.weights."""
