"""Synthetic Pap-smear fields with exact labels (torch-free: numpy + OpenCV)."""
