"""Fitting the step-time model to measured benchmark tables (see the calibration issue)."""
